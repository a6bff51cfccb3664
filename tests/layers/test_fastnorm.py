import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

import normlab
from conftest import skip_unless_ci
from normlab import (
    FastNormConv1d,
    FastNormConv2d,
    FastNormConv3d,
    FastNormLinear,
    FastNormSGD,
    training,
)
from normlab._ext import loader as _native
from normlab.functional import fastnorm as fastnorm_math
from normlab.layers import fastnorm
from normlab.layers.fastnorm import DEFAULT_RENORM_EVERY, RENORM_DRIFT_BOUND, _FastNorm

F64 = torch.float64


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_forward(x, weight, gain, bias):
    """Seed 000 eq. 1 written out: z_i = gain_i (W_i . x) / ||W_i|| + bias_i."""
    rows = [gain[i] * (x @ weight[i]) / weight[i].square().sum().sqrt() + bias[i]
            for i in range(weight.shape[0])]
    return torch.stack(rows, dim=-1)


@pytest.fixture
def update_paths(monkeypatch):
    """Records, per FastNorm layer step, which update ran: "fused" (rank-B, tracked norms)
    or "dense" (materialized gradient, explicit norms)."""
    paths = []
    for name in ("fused", "dense"):
        original = getattr(fastnorm._FastNorm, f"_{name}_update")

        def spy(self, *args, _original=original, _name=name):
            paths.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(fastnorm._FastNorm, f"_{name}_update", spy)
    return paths


def test_from_module_keeps_the_function_with_unit_rows():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5).double()
    layer = FastNormLinear.from_module(linear)
    x = torch.randn(3, 7, dtype=F64)
    assert torch.allclose(layer(x), linear(x))
    assert torch.allclose(layer.gain, linear.weight.norm(dim=1))
    assert torch.allclose(layer.explicit_norms(), torch.ones(5, dtype=F64))
    assert torch.equal(layer.inv_norm, torch.ones(5, dtype=F64))
    assert torch.equal(layer.row_scale, torch.ones(5, dtype=F64))
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


def test_input_gradient_is_eq7():
    torch.manual_seed(0)
    layer = FastNormLinear(5, 4).double()
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    delta = torch.randn(3, 4, dtype=F64)
    layer(x).backward(delta)
    expected = (delta * layer.gain * layer.inv_norm) @ layer.weight  # W^T (t . gain . delta)
    assert torch.allclose(x.grad, expected)


def weight_norm_twin(model, fast):
    """torch's weight_norm on a copy of `model`'s Linear/Conv2d layers, computing the same
    function as the FastNorm copy `fast`: v = the FastNorm rows, g = the gains."""
    explicit = copy.deepcopy(model)
    for index, layer in enumerate(fast):
        if isinstance(layer, fastnorm._FastNorm):
            weight_norm(explicit[index])
            with torch.no_grad():
                params = explicit[index].parametrizations.weight
                params.original0.copy_(layer.gain.view_as(params.original0))
                params.original1.copy_(layer.logical_weight())
    return explicit


def normprop_twin(model, fast):
    """NormProp (normlab's, parametrized) on a copy of `model`, computing the same function
    as the FastNorm copy `fast` (built with input_activation="relu"), with the same
    direction vectors: FastNorm's logical rows."""
    explicit = normlab.convert(model, "normprop")
    for index, layer in enumerate(fast):
        if isinstance(layer, fastnorm._FastNorm):
            with torch.no_grad():
                explicit[index].weight.copy_(layer.logical_weight())
                explicit[index].gain.copy_(layer.gain)
                explicit[index].bias.copy_(layer.bias)
    return explicit


def twin_weights(twin):
    """(effective weight, logical weight) of a weight_norm_twin or normprop_twin layer."""
    if hasattr(twin, "parametrizations"):
        return twin.weight, twin.parametrizations.weight.original1
    return twin.to_plain().weight, twin.weight


def train_twins_and_compare(steps, batch_size, weight_decay, momentum=0.0, lr=0.3,
                            conv_dims=0, twin=weight_norm_twin, **fast_kw):
    """FastNorm (default settings unless `fast_kw`) + FastNormSGD against `twin` (torch's
    weight_norm) + torch.optim.SGD from the same function, float64: outputs, effective
    weights, logical weights and tracked norms agree to 1e-9. `conv_dims`: 0 for an MLP,
    1, 2 or 3 for a CNN of that many spatial dims."""
    torch.manual_seed(0)
    if conv_dims:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[conv_dims - 1]
        plain = nn.Sequential(conv(2, 5, 3, padding=1), nn.ReLU(),
                              conv(5, 3, 3, stride=2), nn.Flatten()).double()
        sample = (2,) + (6,) * conv_dims
    else:
        plain = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3)).double()
        sample = (8,)
    fast = normlab.convert(plain, "fastnorm", **fast_kw)
    explicit = twin(plain, fast)
    fast_opt = FastNormSGD(fast.parameters(), lr=lr, weight_decay=weight_decay,
                           momentum=momentum)
    explicit_opt = torch.optim.SGD(explicit.parameters(), lr=lr, weight_decay=weight_decay,
                                   momentum=momentum)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(batch_size, *sample, dtype=F64, generator=generator)
        y = torch.randint(0, 3, (batch_size,), generator=generator)
        for model, optimizer in ((fast, fast_opt), (explicit, explicit_opt)):
            optimizer.zero_grad()
            F.cross_entropy(model(x).flatten(1)[:, :3], y).backward()
            optimizer.step()
        if step % 150 == 149:  # between renormalizations too, where the norms are tracked
            for layer in (fast[0], fast[2]):
                assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-9
    x = torch.randn(32, *sample, dtype=F64, generator=generator)
    assert relative(fast(x), explicit(x)) < 1e-9
    for index in (0, 2):
        layer, (effective, logical) = fast[index], twin_weights(explicit[index])
        assert relative(layer.to_plain().weight, effective) < 1e-9
        assert relative(layer.logical_weight(), logical) < 1e-9
        assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-9
        assert (layer.explicit_norms() - 1).abs().max() > 1e-3  # the norms moved from 1
    return fast


@pytest.mark.parametrize("batch_size, weight_decay", [(1, 0.0), (16, 1e-3)])
def test_equivalent_to_explicit_weight_norm_for_1000_steps_at_default_settings(
        batch_size, weight_decay, update_paths):
    """The default fused mode and the default renorm_every (renormalized mid-run)."""
    fast = train_twins_and_compare(1000, batch_size, weight_decay)
    assert set(update_paths) == {"fused"}  # every step rank-B with tracked norms
    assert fast[0].mode == "fused" and fast[0].renorm_every == DEFAULT_RENORM_EVERY < 1000
    assert fast[0].weight.grad is None  # no dense gradient in this mode
    assert not torch.equal(fast[0].row_scale, torch.ones(12, dtype=F64))


def test_equivalent_in_the_dense_mode(update_paths):
    fast = train_twins_and_compare(200, 4, 1e-3, mode="dense")
    assert set(update_paths) == {"dense"} and fast[0].weight.grad is not None


@pytest.mark.parametrize("mode", ["fused", "dense"])
def test_momentum_is_equivalent_for_200_steps(mode, update_paths):
    train_twins_and_compare(200, 4, 1e-3, momentum=0.9, mode=mode)
    assert set(update_paths) == {"dense"}  # the momentum buffer is dense in either mode


@pytest.mark.parametrize("dims,steps,cls", [(2, 200, FastNormConv2d), (1, 60, FastNormConv1d),
                                             (3, 60, FastNormConv3d)])
def test_conv_is_equivalent_to_explicit_weight_norm(dims, steps, cls, update_paths):
    fast = train_twins_and_compare(steps, 8, 1e-3, conv_dims=dims)
    assert type(fast[0]) is cls and type(fast[2]) is cls and set(update_paths) == {"dense"}


def test_with_normprops_input_standardization_it_trains_as_normprop():
    """input_activation="relu": NormProp's forward with tracked norms (the FastNorm paper's
    setting), on NormProp's trajectory; the first layer is left unstandardized."""
    fast = train_twins_and_compare(300, 4, 1e-3, twin=normprop_twin, input_activation="relu")
    assert fast[0].input_activation is None and fast[2].input_activation == "relu"


@pytest.mark.parametrize("bias", [True, False])
def test_input_standardization_keeps_the_source_function_and_folds_into_to_plain(bias):
    torch.manual_seed(0)
    source = nn.Linear(6, 4, bias=bias).double()
    layer = FastNormLinear.from_module(source, input_activation="relu")
    normprop = normlab.NormPropLinear.from_module(source, input_activation="relu")
    x = torch.rand(5, 6, dtype=F64)
    assert layer.bias is not None  # the standardization's shift needs one
    for function in (layer, normprop, layer.to_plain()):
        assert relative(function(x), source(x)) < 1e-12
    with pytest.raises(ValueError, match="input_activation must be one of"):
        FastNormLinear(6, 4, input_activation="tanh")
    with pytest.raises(ValueError, match="use NormPropConv2d"):
        FastNormConv2d(2, 3, 3, input_activation="relu")


def test_renormalization_keeps_the_trajectory():
    """Renormalizing every 3 steps moves the norms into s: same training as never."""
    kept = train_twins_and_compare(30, 2, 1e-3, renorm_every=3)
    never = train_twins_and_compare(30, 2, 1e-3, renorm_every=None)
    x = torch.randn(4, 8, dtype=F64)
    assert relative(kept(x), never(x)) < 1e-12
    assert torch.allclose(kept[0].weight.norm(dim=1), torch.ones(12, dtype=F64))


def test_the_papers_reset_to_unit_norm_is_an_option_that_changes_the_trajectory():
    torch.manual_seed(0)
    layer = FastNormLinear(6, 4, renorm_every=3, renorm_resets_norm=True).double()
    optimizer = FastNormSGD(layer.parameters(), lr=1.0)
    for step in range(1, 4):
        optimizer.zero_grad()
        layer(torch.randn(2, 6, dtype=F64)).square().sum().backward()
        optimizer.step()
        if step < 3:
            assert layer.explicit_norms().min() > 1 and int(layer.steps_since_renorm) == step
    assert torch.allclose(layer.explicit_norms(), torch.ones(4, dtype=F64))
    assert torch.allclose(layer.tracked_norms(), torch.ones(4, dtype=F64))
    assert "renorm_resets_norm=True" in repr(layer)


def test_renormalize_on_demand_keeps_the_function_and_the_logical_norms():
    torch.manual_seed(0)
    layer = FastNormLinear(6, 4).double().eval()
    x = torch.randn(5, 6, dtype=F64)
    before, norms = layer(x), layer.explicit_norms()
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([3.0, 0.5, 1.0, 2.0], dtype=F64)[:, None])
    layer.renormalize()  # declares the edit; rows stored normalized again
    assert torch.allclose(layer(x), before)
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(4, dtype=F64))
    assert torch.allclose(layer.explicit_norms(), norms * torch.tensor([3.0, 0.5, 1.0, 2.0],
                                                                        dtype=F64))


def test_batches_above_max_tracked_batch_compute_the_norms_explicitly(monkeypatch):
    explicit = []
    monkeypatch.setattr(FastNormLinear, "explicit_norms",
                        lambda self: explicit.append(True) or _FastNorm.explicit_norms(self))
    layer = FastNormLinear(6, 4, max_tracked_batch=8, dtype=F64)
    optimizer = FastNormSGD(layer.parameters(), lr=0.5)
    for batch_size in (8, 9):
        optimizer.zero_grad()
        layer(torch.randn(batch_size, 6, dtype=F64)).square().sum().backward()
        explicit.clear()
        optimizer.step()
        assert explicit == ([True] if batch_size == 9 else [])  # 9: after the fused update
        assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-12


def test_gradient_accumulation_is_exact_and_misuse_is_reported():
    torch.manual_seed(0)
    layer = FastNormLinear(6, 4, dtype=F64)
    twin = FastNormLinear(6, 4, dtype=F64)
    twin.load_state_dict(layer.state_dict())
    optimizer = FastNormSGD(layer.parameters(), lr=0.5)
    twin_opt = FastNormSGD(twin.parameters(), lr=0.5)
    x = torch.randn(6, 6, dtype=F64)
    for half in (x[:3], x[3:]):  # two backwards accumulate
        layer(half).square().sum().backward()
    optimizer.step()
    twin(x).square().sum().backward()  # one backward on the whole batch
    twin_opt.step()
    assert relative(layer.logical_weight(), twin.logical_weight()) < 1e-12
    assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-12

    layer(x).square().sum().backward()
    layer.zero_grad(set_to_none=False)  # zeroed in place, no step: the record is stale
    layer(x).square().sum().backward()
    with pytest.raises(RuntimeError, match="do not explain the gradient"):
        optimizer.step()
    optimizer.zero_grad()
    layer.eval()  # an eval-mode forward records nothing
    layer(x).square().sum().backward()
    with pytest.raises(RuntimeError, match="no recorded samples explain it"):
        optimizer.step()


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
                explicit = layer.row_scale.double() * layer.weight.double().norm(dim=1)
                drift = (layer.tracked_norms().double() / explicit - 1).abs().max()
                assert drift <= RENORM_DRIFT_BOUND
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert FastNormLinear(3, 2, dtype=torch.bfloat16).inv_norm.dtype == torch.float32
    return model


def test_bfloat16_training_stays_finite_and_within_the_drift_bound():
    model = train_bfloat16_and_check_drift(100, renorm_every=40)
    assert int(model[0].steps_since_renorm) == 20  # renormalized at 40 and 80


def test_bfloat16_training_at_default_settings_across_renormalizations():
    model = train_bfloat16_and_check_drift(2 * DEFAULT_RENORM_EVERY + 50)
    assert int(model[0].steps_since_renorm) == 50


@pytest.mark.slow  # about 1 minute quiet, 5 under load: `pytest -m slow` runs it
def test_bfloat16_training_for_3000_steps_at_default_settings():
    model = train_bfloat16_and_check_drift(3000)
    assert int(model[0].steps_since_renorm) == 3000 % DEFAULT_RENORM_EVERY


def test_float32_and_bfloat16_autocast():
    model = small_mlp(torch.float32)
    optimizer = FastNormSGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    optimizer.step()
    # the recorded outputs are bfloat16 (measured: 2-2.5e-4 over three seeds)
    assert relative(model[0].tracked_norms(), model[0].explicit_norms()) < 1e-3


def test_another_optimizer_is_detected_in_the_fused_mode():
    """torch's SGD steps the gain and bias but cannot apply the fused update to W: the
    lost update is reported at the next forward after its zero_grad."""
    layer = FastNormLinear(6, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="zeroed without a FastNormSGD step"):
        for _ in range(2):
            optimizer.zero_grad()
            layer(torch.randn(2, 6)).square().sum().backward()
            optimizer.step()
    with torch.no_grad():
        layer.weight.mul_(2)  # an edit, not declared
    with pytest.raises(RuntimeError, match="changed outside FastNormSGD"):
        layer(torch.randn(2, 6))
    layer.renormalize()
    assert torch.isfinite(layer(torch.randn(2, 6))).all()


def test_the_dense_mode_recomputes_the_norms_after_an_outside_change():
    """mode="dense" leaves weight.grad to any tool (here torch's SGD and clipping)."""
    layer = FastNormLinear(6, 4, mode="dense", dtype=F64)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(2, 6, dtype=F64)).square().sum().backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.1)
        optimizer.step()
        layer(torch.randn(1, 6, dtype=F64))  # notices the change, recomputes t
        assert relative(layer.tracked_norms(), layer.explicit_norms()) < 1e-12
    with pytest.raises(ValueError, match="mode must be one of"):
        FastNormConv2d(2, 3, 3, mode="fused")


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
    with pytest.raises(ValueError, match=r"renorm_every \(or None\) must be a positive int"):
        FastNormLinear(3, 3, renorm_every=0)
    layer = FastNormLinear(3, 2)
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 3\), got \(2, 4\)"):
        layer(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
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
    assert set(model[0].state_dict()) == {"weight", "gain", "bias", "inv_norm", "row_scale",
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


def test_conv2d_is_registered_and_checks_its_arguments_and_input():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4), nn.ReLU())
    converted = normlab.convert(cnn, "fastnorm")
    assert isinstance(converted[0], FastNormConv2d) and isinstance(converted[1], nn.Identity)
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(converted[0](x), cnn[0](x), atol=1e-6)
    assert torch.allclose(converted[0].to_plain()(x), cnn[0](x), atol=1e-6)
    with pytest.raises(ValueError, match="groups must divide"):
        FastNormConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        converted[0](torch.randn(2, 4, 6, 6))
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        FastNormConv2d.from_module(nn.Linear(2, 2))


@pytest.mark.parametrize("dims,cls", [(1, FastNormConv1d), (3, FastNormConv3d)])
def test_conv1d_and_conv3d_are_registered_and_keep_the_function(dims, cls):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    cnn = nn.Sequential(conv(3, 4, 3, stride=2, padding=1, groups=1), nn.ReLU()).double()
    converted = normlab.convert(cnn, "fastnorm")
    assert type(converted[0]) is cls and normlab.registry.get("fastnorm").replaces[conv] is cls
    assert getattr(normlab, cls.__name__) is cls
    x = torch.randn(2, 3, *(5,) * dims, dtype=F64)
    assert relative(converted[0](x), cnn[0](x)) < 1e-12
    plain = converted[0].to_plain()
    assert type(plain) is conv and relative(plain(x), cnn[0](x)) < 1e-12
    # rows stored at unit norm, the norms in the gain: the row norms are tracked exactly
    torch.testing.assert_close(converted[0].explicit_norms(), torch.ones(4, dtype=F64))
    torch.testing.assert_close(converted[0].gain, cnn[0].weight.flatten(1).norm(dim=1))
    positions = ("L", "D, H, W")[dims == 3]
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected input of shape "
                                         rf"\(N, 3, {positions}\), got \(3, 5\)"):
        converted[0](torch.randn(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="padding_mode must be one of \\['zeros'\\]"):
        cls(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        cls.from_module(conv(3, 4, 3, padding=1, padding_mode="circular"))


def test_a_checkpoint_without_the_row_scale_loads_with_unit_scales():
    layer = FastNormLinear(5, 3)
    state = {k: v for k, v in layer.state_dict().items() if k != "row_scale"}
    restored = FastNormLinear(5, 3)
    restored.row_scale.fill_(2)
    restored.load_state_dict(state)
    assert torch.equal(restored.row_scale, torch.ones(3))


# -- the compiled kernels (csrc/fastnorm.cpp) against their eager specification --

def compiled_kernel():
    kernel = _native.module("fastnorm")
    if kernel is None:
        skip_unless_ci("the compiled FastNorm kernel could not be built on this machine")
    return kernel


def one_training_step(layer, x, lr=0.3, weight_decay=1e-3, eager=False, monkeypatch=None):
    """Forward, backward and FastNormSGD step on `layer`, returning what each produced."""
    if eager:
        monkeypatch.setattr(fastnorm_math, "compiled_kernel", lambda *args: None)
    x = x.clone().requires_grad_()
    optimizer = FastNormSGD(layer.parameters(), lr=lr, weight_decay=weight_decay)
    z = layer(x)
    (z * torch.linspace(-1, 2, z.shape[-1], dtype=z.dtype)).square().sum().backward()
    grads = (x.grad, layer.gain.grad.clone(),
             layer.bias.grad.clone() if layer.bias is not None else torch.ones(()))
    optimizer.step()
    if eager:
        monkeypatch.undo()
    return (z.detach(), *grads, layer.weight.detach().clone(), layer.row_scale.clone(),
            layer.inv_norm.clone(), layer.gain.detach().clone(),
            layer.bias.detach().clone() if layer.bias is not None else torch.ones(()))


@pytest.mark.parametrize("dtype, batch_shape, tolerance, max_tracked_batch", [
    (F64, (1,), 1e-12, 16), (F64, (5,), 1e-12, 16), (F64, (2, 3), 1e-12, 16),  # leading dims
    (F64, (6,), 1e-12, 4),  # above max_tracked_batch: explicit norms
    (torch.float32, (4,), 1e-5, 16), (torch.bfloat16, (3,), 2e-2, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_compiled_kernels_compute_what_the_eager_path_computes(
        dtype, batch_shape, tolerance, max_tracked_batch, bias, monkeypatch):
    compiled_kernel()
    torch.manual_seed(0)
    layer = FastNormLinear(7, 5, bias=bias, max_tracked_batch=max_tracked_batch, dtype=dtype)
    with torch.no_grad():  # rows off unit norm and s != 1, as after training
        layer.weight.mul_(torch.linspace(0.7, 1.6, 5).to(dtype)[:, None])
        layer.row_scale.mul_(torch.linspace(0.5, 2, 5))
        layer.gain.mul_(torch.linspace(-1, 3, 5).to(dtype))
    layer._refresh_norms()
    twin = copy.deepcopy(layer)
    x = torch.randn(*batch_shape, 7, dtype=dtype)
    calls = []
    monkeypatch.setattr(_native, "module", lambda name, _m=_native.module: calls.append(name)
                        or _m(name))
    compiled = one_training_step(layer, x)
    assert calls  # the compiled path ran
    eager = one_training_step(twin, x, eager=True, monkeypatch=monkeypatch)
    for name, a, b in zip(("z", "x.grad", "gain.grad", "bias.grad", "V", "s", "t", "gain",
                           "bias"), compiled, eager):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert relative(a.double(), b.double()) < tolerance, name


def test_the_compiled_step_writes_nothing_when_the_samples_do_not_explain_the_gradient():
    compiled_kernel()
    layer = FastNormLinear(6, 4, dtype=F64)
    optimizer = FastNormSGD(layer.parameters(), lr=0.5)
    x = torch.randn(3, 6, dtype=F64)
    layer(x).square().sum().backward()
    layer.gain.grad.add_(1.0)  # a gradient the recorded samples do not explain
    before = [t.clone() for t in (layer.weight, layer.row_scale, layer.inv_norm)]
    with pytest.raises(RuntimeError, match="do not explain the gradient"):
        optimizer.step()
    for old, new in zip(before, (layer.weight, layer.row_scale, layer.inv_norm)):
        assert torch.equal(old, new)


def test_the_fused_forward_has_no_double_backward():
    layer = FastNormLinear(6, 4)
    x = torch.randn(2, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


def test_the_eager_path_is_equivalent_to_explicit_weight_norm_too(monkeypatch, update_paths):
    """What runs where the kernels do not (other devices, tracing, no C++ compiler)."""
    monkeypatch.setattr(fastnorm_math, "compiled_kernel", lambda *args: None)
    train_twins_and_compare(300, 4, 1e-3)
    assert set(update_paths) == {"fused"}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fastnormsgd_steps_the_other_parameters_as_torch_sgd(weight_decay):
    """Gains and biases (updated by the compiled step, or by torch's SGD on the eager path)
    and a plain layer's parameters all get torch.optim.SGD's update."""
    torch.manual_seed(0)
    model = nn.Sequential(FastNormLinear(6, 5, dtype=F64), nn.ReLU(), nn.Linear(5, 3).double())
    optimizer = FastNormSGD(model.parameters(), lr=0.3, weight_decay=weight_decay)
    model(torch.randn(2, 6, dtype=F64)).square().sum().backward()
    others = [model[0].gain, model[0].bias, model[2].weight, model[2].bias]
    expected = [p.detach() - 0.3 * (p.grad + weight_decay * p.detach()) for p in others]
    optimizer.step()
    for param, value in zip(others, expected):
        torch.testing.assert_close(param.detach(), value, rtol=1e-14, atol=1e-15)

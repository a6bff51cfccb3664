import copy
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import skip_unless_ci
from normlab import ENorm, models, registry
from normlab._ext import loader as _native
from normlab.rebalancers.enorm import SCHEDULES
from normlab.training import TrainConfig, train


def _mlp(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.ReLU(), nn.Linear(8, 7, bias=bias),
                         nn.LeakyReLU(0.1), nn.Dropout(0.5), nn.Linear(7, 3, bias=bias))


class _FunctionalCNN(nn.Module):
    """Max and average pooling, functional relu/flatten: pairs must come from the graph."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(5 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.pool2(torch.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _cnn_adaptive() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unbalanced weights, so that a cycle moves them far from where they were."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            scale = torch.rand(param.shape[0], generator=generator) * 4 + 0.1
            param.copy_(torch.randn(param.shape, generator=generator)
                        * scale.view(-1, *[1] * (param.dim() - 1)))
    return model


def _reference_cycle(layers, c: float, p: float, balance_bias: bool) -> None:
    """One ENorm cycle on a chain of nn.Linear/nn.Conv2d, unit by unit, from the formula.

    Unit i of a layer is its output channel: its row is its whole kernel (and bias), its
    column the next layer's weights that read it (a kernel slice, or after a channel-major
    flatten the block of columns i * block ... (i + 1) * block).
    """
    with torch.no_grad():
        for first, second in zip(layers[:-1], layers[1:]):
            units = first.weight.shape[0]
            columns = second.weight.view(second.weight.shape[0], units, -1)
            for i in range(units):
                row = first.weight[i].flatten()
                if balance_bias:
                    row = torch.cat([row, first.bias[i:i + 1]])
                d = torch.sqrt(torch.linalg.vector_norm(columns[:, i], p)
                               / (c * torch.linalg.vector_norm(row, p)))
                first.weight[i] *= d
                if first.bias is not None:
                    first.bias[i] *= d
                columns[:, i] /= d


@pytest.mark.parametrize("c, p, balance_bias", [(1.0, 2, False), (1.2, 2, True), (0.8, 3, True)])
def test_one_cycle_equals_the_formula_on_a_fully_connected_chain(c, p, balance_bias):
    model = _randomize(_mlp()).double()
    expected = _randomize(_mlp()).double()
    ENorm(model, c=c, p=p, balance_bias=balance_bias).step()
    _reference_cycle([expected[0], expected[2], expected[5]], c, p, balance_bias)
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the cycle did move the weights: the comparison is not between unchanged copies
    assert not torch.allclose(model[0].weight, _randomize(_mlp()).double()[0].weight)


def _official_reference(weights, c: float, p: float) -> list[torch.Tensor]:
    """The official schedule, from its description: d_k for the pairs (k, k+1) with
    k = 0 .. L-3 (the last pair is skipped), each from the norms as they were before the
    cycle; then W_k <- diag(d_k) W_k diag(1 / d_{k-1})."""
    d = [torch.sqrt(torch.linalg.vector_norm(weights[k + 1], p, dim=0)
                    / (c * torch.linalg.vector_norm(weights[k], p, dim=1)))
         for k in range(len(weights) - 2)]
    out = []
    for k, weight in enumerate(weights):
        rows = d[k] if k < len(d) else torch.ones(len(weight), dtype=weight.dtype)
        columns = 1 / d[k - 1] if 0 < k <= len(d) else torch.ones(weight.shape[1],
                                                                   dtype=weight.dtype)
        out.append(rows[:, None] * weight * columns[None, :])
    return out


@pytest.mark.parametrize("c, p", [(1.0, 2), (1.2, 3)])
def test_official_schedule_equals_its_description_and_differs_from_the_paper(c, p):
    model = _randomize(_mlp(bias=False)).double()
    linears = [model[0], model[2], model[5]]
    weights = [layer.weight.detach().clone() for layer in linears]
    official = ENorm(model, c=c, p=p, schedule="official")
    assert official.pairs == [("0", "2")]  # the last hidden layer (2, 5) is left alone
    official.step()
    for layer, want in zip(linears, _official_reference(weights, c, p)):
        torch.testing.assert_close(layer.weight, want, rtol=1e-12, atol=1e-12)
    deep = _randomize(models.fc_cifar(3, width=9, in_features=12)).double()
    paper = copy.deepcopy(deep)
    weights = [m.weight.detach().clone() for m in deep.modules() if isinstance(m, nn.Linear)]
    ENorm(deep, c=c, p=p, schedule="official").step()
    ENorm(paper, c=c, p=p).step()
    got = [m.weight for m in deep.modules() if isinstance(m, nn.Linear)]
    for layer, want in zip(got, _official_reference(weights, c, p)):
        torch.testing.assert_close(layer, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[-1], weights[-1])  # the classifier is untouched
    paper_weights = [m.weight for m in paper.modules() if isinstance(m, nn.Linear)]
    assert not torch.allclose(got[1], paper_weights[1])  # later pairs read other norms
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(deep(x), paper(x))  # both keep the function


def test_official_schedule_needs_two_pairs_in_a_chain():
    with pytest.raises(ValueError, match="nothing to balance"):
        ENorm(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), schedule="official")
    with pytest.raises(ValueError, match="schedule must be one of"):
        ENorm(_mlp(), schedule="authors")


@pytest.mark.parametrize("build, layers", [
    (_FunctionalCNN, ["conv1", "conv2", "fc1", "fc2"]),  # conv -> conv -> flatten -> linear
    (_cnn_adaptive, ["0", "2", "6"]),  # conv -> conv -> adaptive pool, flatten -> linear
])
@pytest.mark.parametrize("c, p, balance_bias", [(1.0, 2, False), (1.2, 3, True)])
def test_one_cycle_equals_the_formula_on_conv_and_flatten_chains(build, layers, c, p,
                                                                 balance_bias):
    model, expected = _randomize(build()).double(), _randomize(build()).double()
    assert ENorm(model).pairs == list(zip(layers[:-1], layers[1:]))
    ENorm(model, c=c, p=p, balance_bias=balance_bias).step()
    _reference_cycle([expected.get_submodule(name) for name in layers], c, p, balance_bias)
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    assert not torch.allclose(model.get_submodule(layers[1]).weight,
                              _randomize(build()).double().get_submodule(layers[1]).weight)


@pytest.mark.parametrize("build, shape", [(_mlp, (16, 6)), (_FunctionalCNN, (4, 3, 8, 8)),
                                          (_cnn_adaptive, (4, 3, 8, 8))])
@pytest.mark.parametrize("balance_bias", [False, True])
def test_the_function_is_unchanged_in_float64(build, shape, balance_bias):
    model = _randomize(build()).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    before = model(x)
    weights = [param.clone() for param in model.parameters()]
    ENorm(model, c=1.2, balance_bias=balance_bias).step()
    torch.testing.assert_close(model(x), before, rtol=1e-12,
                               atol=1e-12 * before.abs().max().item())
    assert any(not torch.allclose(w, param) for w, param in zip(weights, model.parameters()))


def test_pairs_come_from_the_graph():
    assert ENorm(_FunctionalCNN()).pairs == [("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2")]
    assert ENorm(models.fc_cifar(p=2)).pairs == [("1", "4"), ("4", "7"), ("7", "10")]
    # a residual addition ends a chain; the layers inside the branch still pair
    resnet = models.cifar_resnet(depth=8, norm="none")
    assert ENorm(resnet).pairs == [("3.conv1", "3.conv2"), ("4.conv1", "4.conv2"),
                                   ("5.conv1", "5.conv2")]


@pytest.mark.parametrize("between", [nn.Tanh(), nn.Softmax(dim=1), nn.ReLU6()])
def test_a_non_homogeneous_operation_ends_the_chain(between):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), between, nn.Linear(4, 2))
    assert ENorm(model).pairs == [("0", "2")]


def test_units_must_line_up_with_the_next_layer():
    # conv -> linear without a flatten acts on the width, not on the channels
    no_flatten = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(),
                               nn.Linear(2, 2))
    assert ENorm(no_flatten).pairs == [("2", "4")]
    # pooling after a Linear would mix its units
    pooled = nn.Sequential(nn.Linear(4, 4), nn.MaxPool1d(2), nn.Linear(2, 2), nn.ReLU(),
                           nn.Linear(2, 2))
    assert ENorm(pooled).pairs == [("2", "4")]


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.fc2(self.fc1(x).relu())


def test_untraceable_and_pairless_models_raise_clear_errors():
    with pytest.raises(ValueError, match="cannot be traced"):
        ENorm(_Untraceable())
    with pytest.raises(ValueError, match="no pair"):
        ENorm(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="c must be > 0"):
        ENorm(_mlp(), c=0)
    with pytest.raises(ValueError, match="p must be"):
        ENorm(_mlp(), p=float("inf"))
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        ENorm(_mlp(), batchnorm="keep")


def _squared_weights(model: nn.Module) -> float:
    return sum(float(m.weight.detach().square().sum()) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("build", [lambda: _mlp(bias=False), _FunctionalCNN, _cnn_adaptive])
def test_c1_decreases_the_sum_of_squares_monotonically_and_converges(build):
    model = _randomize(build()).double()
    enorm = ENorm(model, c=1.0)
    costs = [_squared_weights(model)]
    for _ in range(50):
        enorm.step()
        costs.append(_squared_weights(model))
    changes = [before - after for before, after in zip(costs[:-1], costs[1:])]
    assert all(change >= -1e-12 * costs[0] for change in changes)
    assert changes[0] > 0.01 * costs[0]
    assert changes[-1] < 1e-6 * changes[0]


def _factors(before, after):
    return [a / b for a, b in zip(after, before)]


@pytest.mark.parametrize("build, shape, classes", [(lambda: _mlp(bias=False), (32, 6), 3),
                                                   (_FunctionalCNN, (8, 3, 8, 8), 2)])
@pytest.mark.parametrize("make_optimizer, keys", [
    (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), {"momentum_buffer": -1}),
    (lambda params: torch.optim.Adam(params, lr=0.01, amsgrad=True),
     {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}),
    (lambda params: torch.optim.AdamW(params, lr=0.01), {"exp_avg": -1, "exp_avg_sq": -2}),
])
def test_optimizer_state_stays_consistent_with_the_rescaled_weights(make_optimizer, keys, build,
                                                                   shape, classes):
    """The rescaled run's state after its next step equals the unrescaled run's, mapped by
    the same factors: the rescaled state is what training in the new weights would hold."""
    torch.manual_seed(0)
    x, y = torch.randn(shape, dtype=torch.float64), torch.randint(0, classes, (shape[0],))
    runs = []
    for rescale in (False, True):
        model = _randomize(build()).double().eval()  # no dropout: same gradients
        optimizer = make_optimizer(model.parameters())
        for step in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if rescale and step == 0:
                before = [p.detach().clone() for p in model.parameters()]
                ENorm(model, optimizer).step()
                factors = _factors(before, [p.detach() for p in model.parameters()])
        runs.append((model, optimizer))
    (plain, plain_opt), (balanced, balanced_opt) = runs
    for param, ref, factor in zip(balanced.parameters(), plain.parameters(), factors):
        for key, power in keys.items():
            torch.testing.assert_close(balanced_opt.state[param][key] * factor ** -power,
                                       plain_opt.state[ref][key], rtol=1e-6, atol=1e-12)
    assert any(not torch.allclose(f, torch.ones_like(f)) for f in factors)


def test_without_the_optimizer_its_state_is_inconsistent():
    model = _randomize(_mlp(bias=False)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(8, 6, dtype=torch.float64)),
                    torch.randint(0, 3, (8,))).backward()
    optimizer.step()
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    ENorm(model).step()
    assert all(torch.equal(b, optimizer.state[p]["momentum_buffer"])
               for b, p in zip(buffers, model.parameters()))
    ENorm(model, optimizer).step()  # now the buffers follow the (second) rescaling
    assert any(not torch.equal(b, optimizer.state[p]["momentum_buffer"])
               for b, p in zip(buffers, model.parameters()))


def test_other_stateful_optimizers_raise():
    model = _mlp()
    with pytest.raises(ValueError, match=r"cannot rescale the state \['sum'\] that Adagrad"):
        ENorm(model, torch.optim.Adagrad(model.parameters()))
    optimizer = torch.optim.RMSprop(model.parameters())
    enorm = ENorm(model, optimizer)  # RMSprop creates its state at its first step
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="supported optimizers: SGD, Adam, AdamW"):
        enorm.step()


def test_dead_units_stay_finite_and_unscaled():
    model = _randomize(_mlp()).double()
    with torch.no_grad():
        model[0].weight[2] = 0  # unit 2 receives nothing
        model[0].bias[2] = 0
        model[2].weight[:, 5] = 0  # unit 5 sends nothing
        model[2].weight[4] = 0  # a unit of the second pair, dead both ways
        model[2].bias[4] = 0
        model[5].weight[:, 4] = 0
    x = torch.randn(16, 6, dtype=torch.float64)
    before = model.eval()(x)
    ENorm(model, balance_bias=True).step()
    assert all(torch.isfinite(param).all() for param in model.parameters())
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    # one pair: the dead units' columns and rows are left as they were (d = 1)
    pair = _randomize(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).double()
    with torch.no_grad():
        pair[0].weight[0], pair[0].bias[0], pair[2].weight[:, 1] = 0, 0, 0
    row, column = pair[0].weight[1].clone(), pair[2].weight[:, 0].clone()
    ENorm(pair, balance_bias=True).step()
    assert torch.equal(pair[0].weight[1], row) and torch.equal(pair[2].weight[:, 0], column)
    assert not torch.equal(pair[0].weight[2], _randomize(
        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).double()[0].weight[2])


def _bn_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(),
                         nn.Linear(5, 3, bias=False))


def test_batchnorm_official_mode_balances_the_weights_as_if_it_were_absent():
    model = _randomize(_bn_mlp()).double()
    reference = [copy.deepcopy(model[i]) for i in (0, 3, 6)]
    enorm = ENorm(model)
    assert enorm.pairs == [("0", "3"), ("3", "6")]
    enorm.step()
    _reference_cycle(reference, 1.0, 2, False)
    for i, ref in zip((0, 3, 6), reference):
        torch.testing.assert_close(model[i].weight, ref.weight)


def test_batchnorm_affine_mode_keeps_the_function():
    model = _randomize(_bn_mlp()).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    model.train()(x)  # running statistics that differ from the defaults
    model.eval()
    before, first = model(x), model[0].weight.clone()
    enorm = ENorm(model, c=1.2, balance_bias=True, batchnorm="affine")
    assert enorm.pairs == [("1", "3"), ("4", "6")]
    enorm.step()
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert torch.equal(model[0].weight, first)  # BatchNorm holds the scale instead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_weights(dtype):
    model = _randomize(_FunctionalCNN()).to(dtype).eval()
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    before = model(x).float()
    ENorm(model, c=1.2).step()
    after = model(x).float()
    assert torch.isfinite(after).all()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(after, before, rtol=tolerance,
                               atol=tolerance * before.abs().max().item())


@pytest.mark.usefixtures("needs_sklearn")
def test_registered_as_a_rebalancer_and_trains_with_and_without_batchnorm():
    method = registry.get("enorm")
    assert method.family == "rebalancer" and method.rebalancer is ENorm
    for norm in ("enorm", "batch+enorm"):
        result = train(TrainConfig(task="digits-mlp", norm=norm, lr=0.05, batch_size=64,
                                   momentum=0.9, rebalancer_kw={"c": 1.2}))
        assert result.status == "done" and result.final["test_acc"] > 0.8
        # Training ended on an ENorm cycle, after which each unit of the last pair has
        # ||column|| = c ||row||: a rebalancer that was not stepped, or did nothing, fails.
        (first, second), = ENorm(result.model).pairs
        rows = result.model.get_submodule(first).weight.detach().double().norm(dim=1)
        columns = result.model.get_submodule(second).weight.detach().double().norm(dim=0)
        torch.testing.assert_close(columns / rows, torch.full_like(rows, 1.2), rtol=1e-5,
                                   atol=0)


# -- the compiled cycle (csrc/enorm.cpp) against the eager path, its specification --

@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the compiled cycle's calls (a test of it that silently ran the eager path
    would compare the eager path with itself)."""
    if _native.module("enorm", openmp=True) is None:
        skip_unless_ci("the compiled ENorm kernel could not be built on this machine")
    calls = []
    compiled = ENorm._kernel

    class Spy:
        def __init__(self, module):
            self.module = module

        def balance_chain(self, *args):
            calls.append(args)
            return self.module.balance_chain(*args)

    def spied(enorm, params, states):
        module = compiled(enorm, params, states)
        return None if module is None else Spy(module)
    monkeypatch.setattr(ENorm, "_kernel", spied)
    return calls


def _eager_only(monkeypatch):
    monkeypatch.setattr(ENorm, "_kernel", lambda enorm, params, states: None)


_OPTIMIZERS = {
    "none": None,
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, amsgrad=True),
}
_CHAINS = {  # (build, input shape, classes)
    "mlp": (_mlp, (8, 6), 3),
    "fc": (lambda: models.fc_cifar(2, width=9, in_features=12, bias=True), (8, 12), 10),
    "conv+flatten": (_FunctionalCNN, (4, 3, 8, 8), 2),
}


def _trained(chain: str, optimizer: str, dtype: torch.dtype):
    """Unbalanced weights with one optimizer step's state (None: no optimizer)."""
    build, shape, classes = _CHAINS[chain]
    model = _randomize(build()).to(dtype).eval()
    if _OPTIMIZERS[optimizer] is None:
        return model, None
    opt = _OPTIMIZERS[optimizer](model.parameters())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).to(dtype)
    y = torch.randint(0, classes, (shape[0],), generator=generator)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model, opt


def _state_tensors(model, optimizer) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [value for param in model.parameters() for value in optimizer.state[param].values()
            if value.shape == param.shape]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 8e-7)])
@pytest.mark.parametrize("chain, optimizer", [("mlp", "sgd"), ("fc", "none"), ("fc", "adam"),
                                              ("conv+flatten", "sgd"), ("conv+flatten", "adam")])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p, balance_bias", [(2, False), (2, True), (3, True)])
def test_the_compiled_cycle_equals_the_eager_one(kernel_calls, monkeypatch, dtype, rtol, chain,
                                                  optimizer, schedule, p, balance_bias):
    kw = dict(c=1.2, p=p, balance_bias=balance_bias, schedule=schedule)
    compiled, compiled_opt = _trained(chain, optimizer, dtype)
    before = [param.detach().clone() for param in compiled.parameters()]
    ENorm(compiled, compiled_opt, **kw).step()
    assert len(kernel_calls) == 1
    _eager_only(monkeypatch)
    eager, eager_opt = _trained(chain, optimizer, dtype)
    ENorm(eager, eager_opt, **kw).step()
    for got, want in zip([*compiled.parameters(), *_state_tensors(compiled, compiled_opt)],
                         [*eager.parameters(), *_state_tensors(eager, eager_opt)]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert len(_state_tensors(compiled, compiled_opt)) == {"none": 0, "sgd": 1, "adam": 3}[
        optimizer] * len(before)
    assert not all(torch.equal(b, a) for b, a in zip(before, compiled.parameters()))


def test_the_compiled_cycle_leaves_dead_units_unscaled_as_the_eager_one(kernel_calls,
                                                                        monkeypatch):
    def with_dead_units():
        model = _randomize(_mlp()).double()
        with torch.no_grad():
            model[0].weight[2], model[0].bias[2] = 0, 0  # unit 2 receives nothing
            model[2].weight[:, 5] = 0  # unit 5 sends nothing
        return model
    compiled, eager = with_dead_units(), with_dead_units()
    ENorm(compiled, balance_bias=True).step()
    assert len(kernel_calls) == 1
    _eager_only(monkeypatch)
    ENorm(eager, balance_bias=True).step()
    assert all(torch.isfinite(param).all() for param in compiled.parameters())
    for got, want in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_the_eager_path_runs_where_the_kernel_does_not_apply(kernel_calls, monkeypatch):
    ENorm(_randomize(_mlp()).to(torch.bfloat16)).step()  # dtype
    ENorm(_randomize(_mlp()).double(), p=2.5).step()  # p
    model = _randomize(_mlp()).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    optimizer.step()
    optimizer.state[model[0].weight]["momentum_buffer"] = \
        optimizer.state[model[0].weight]["momentum_buffer"].float()  # state of another dtype
    ENorm(model, optimizer).step()
    assert kernel_calls == []
    monkeypatch.setenv("NORMLAB_NATIVE", "0")
    monkeypatch.setattr(_native, "_loaded", {})
    ENorm(_randomize(_mlp())).step()
    assert kernel_calls == []


def _cpu_ticks_by_thread() -> dict[str, int]:
    ticks = {}
    for thread in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{thread}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks[thread] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
def test_the_compiled_cycle_runs_on_torchs_threads(kernel_calls):
    model = nn.Sequential(*[module for _ in range(4) for module in (nn.Linear(512, 512),
                                                                    nn.ReLU())])
    enorm = ENorm(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        enorm.step()
        before = _cpu_ticks_by_thread()
        for _ in range(150):
            enorm.step()
        after = _cpu_ticks_by_thread()
    finally:
        torch.set_num_threads(threads)
    busy = [thread for thread in after if after[thread] > before.get(thread, 0)]
    assert len(kernel_calls) == 151 and len(busy) >= 2, busy

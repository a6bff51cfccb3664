"""Filter Response Normalization with TLU (Singh and Krishnan 2020) against the paper's
equations, in float64."""

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab.layers.filter_response_norm import (
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
)

CLASS_SHAPES = [(FilterResponseNorm1d, (5, 3)), (FilterResponseNorm1d, (5, 3, 7)),
                (FilterResponseNorm2d, (4, 3, 5, 6)), (FilterResponseNorm3d, (2, 3, 3, 4, 5))]


def reference(x, gamma, beta, tau, eps):
    """The paper's eqs. 1-3, sample by sample and channel by channel, in float64:
    nu2 = mean(x^2) over the channel's positions; y = gamma x / sqrt(nu2 + eps) + beta;
    z = max(y, tau)."""
    x = x.double()
    z = torch.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            response = x[n, c]
            nu2 = (response ** 2).mean()
            y = float(gamma[c]) * response / torch.sqrt(nu2 + float(eps)) + float(beta[c])
            z[n, c] = torch.clamp(y, min=float(tau[c]))
    return z


def randomized(norm):
    torch.manual_seed(1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.tau.uniform_(-0.5, 0.5)
        if norm.eps_offset is not None:
            norm.eps_offset.fill_(-0.3)  # a negative offset: eps + |offset| is used
    return norm


@pytest.mark.parametrize("learnable_eps", [False, True])
@pytest.mark.parametrize("cls,shape", CLASS_SHAPES)
def test_matches_the_papers_equations_in_float64(cls, shape, learnable_eps):
    norm = randomized(cls(shape[1], learnable_eps=learnable_eps).double())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = 1e-6 + (0.3 if learnable_eps else 0.0)
    expected = reference(x, *(p.detach() for p in (norm.weight, norm.bias, norm.tau)), eps)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert (norm(x) > norm.tau.view(1, -1, *[1] * (len(shape) - 2)) - 1e-12).all()


@pytest.mark.parametrize("learnable_eps", [False, True])
@pytest.mark.parametrize("cls,shape", CLASS_SHAPES)
def test_gradcheck(cls, shape, learnable_eps):
    norm = randomized(cls(shape[1], eps=1e-2, learnable_eps=learnable_eps).double())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = tuple(p for p in (norm.weight, norm.bias, norm.tau, norm.eps_offset)
                   if p is not None)

    def fn(x, *values):
        return torch.func.functional_call(norm, dict(zip(
            ["weight", "bias", "tau", "eps_offset"][:len(values)], values)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params))


def test_each_sample_is_normalized_alone_in_training_and_evaluation():
    norm = randomized(FilterResponseNorm2d(3)).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    batched = norm(x)
    for i in range(6):
        torch.testing.assert_close(norm(x[i:i + 1]), batched[i:i + 1], rtol=0, atol=0)
    torch.testing.assert_close(norm.eval()(x), batched, rtol=0, atol=0)


def test_the_learned_eps_gets_a_gradient_and_the_fixed_one_none():
    learned = FilterResponseNorm1d(3, learnable_eps=True)
    learned(torch.randn(4, 3)).sum().backward()
    assert learned.eps_offset.grad is not None and learned.eps_offset.grad != 0
    assert [name for name, _ in FilterResponseNorm1d(3).named_parameters()] == \
        ["weight", "bias", "tau"]


def test_bad_input_and_arguments_are_refused_naming_what_was_expected():
    with pytest.raises(ValueError, match=r"expects a 4-D input .* got shape \(2, 3, 4\)"):
        FilterResponseNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expects 3 channels .* got shape \(2, 4, 5\)"):
        FilterResponseNorm1d(3)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="eps"):
        FilterResponseNorm1d(3, eps=0.0)
    with pytest.raises(ValueError, match="num_features"):
        FilterResponseNorm3d(0)


def test_registry_builds_it_and_convert_sync_and_fold_leave_it_as_it_is():
    assert type(normlab.create("frn", 8, 1)) is FilterResponseNorm1d
    assert type(normlab.create("frn", 8, 2)) is FilterResponseNorm2d
    assert type(normlab.create("frn", 8, 3)) is FilterResponseNorm3d
    model = normlab.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
                            "frn")
    assert type(model[1]) is FilterResponseNorm2d
    before = copy.deepcopy(model.state_dict())
    synced = normlab.convert_sync(model)  # batch-independent: nothing to sync
    assert synced is model and type(model[1]) is FilterResponseNorm2d
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    folded = normlab.fold(model)  # a per-sample statistic: no affine form to fold
    assert type(folded[1]) is FilterResponseNorm2d and not folded.training
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), model.eval()(x))

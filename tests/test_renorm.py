import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normlab
from normlab import registry, training
from normlab.renorm import Renormalize


def _explicit_sgd_reference(weight, gain, bias, inputs, targets, lr):
    """FastNorm paper eq. (3) with ||W_i|| = 1 before each step, then W_i / ||W_i||.

    z = gain * (W_i . h) + b for unit rows; delta = dL/dz of a mean squared
    error; the row update is -lr * delta_i * gain_i * (h - W_i (W_i . h)),
    and the explicit normalization divides each row by its norm.
    """
    weight = weight / weight.norm(dim=1, keepdim=True)
    for h, y in zip(inputs, targets):
        wh = weight @ h
        z = gain * wh + bias
        delta = 2 * (z - y) / len(z)
        grad = (delta * gain)[:, None] * (h[None, :] - weight * wh[:, None])
        gain, bias = gain - lr * delta * wh, bias - lr * delta
        weight = weight - lr * grad
        weight = weight / weight.norm(dim=1, keepdim=True)
    return weight, gain, bias


def _train(layer, inputs, targets, lr, renorm: bool):
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    companion = Renormalize(layer, optimizer) if renorm else None
    for h, y in zip(inputs, targets):
        optimizer.zero_grad()
        F.mse_loss(layer(h[None]), y[None]).backward()
        optimizer.step()
        if companion is not None:
            companion.step()
    return layer


def test_sgd_with_renormalize_is_the_explicit_normalization_of_the_paper():
    torch.manual_seed(0)
    layer = normlab.WeightNormLinear(6, 4).double()
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    start = [p.detach().clone() for p in (layer.weight, layer.gain, layer.bias)]
    inputs, targets = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 4,
                                                                           dtype=torch.float64)
    Renormalize(layer).step()  # the explicit scheme starts from unit rows
    _train(layer, inputs, targets, lr=0.3, renorm=True)
    weight, gain, bias = _explicit_sgd_reference(*start, inputs, targets, lr=0.3)
    torch.testing.assert_close(layer.weight, weight)
    torch.testing.assert_close(layer.gain, gain)
    torch.testing.assert_close(layer.bias, bias)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_renormalizing_keeps_the_function_but_not_the_parametrized_trajectory():
    torch.manual_seed(1)
    parametrized = normlab.NormPropConv2d(3, 5, 3, padding=1).double()
    explicit = normlab.NormPropConv2d(3, 5, 3, padding=1).double()
    explicit.load_state_dict(parametrized.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = explicit(x)
    Renormalize(explicit).step()
    torch.testing.assert_close(explicit(x), before)  # the function is kept
    inputs, targets = torch.randn(30, 3, 6, 6, dtype=torch.float64), torch.randn(
        30, 5, 6, 6, dtype=torch.float64)
    for layer, renorm in ((parametrized, False), (explicit, True)):
        _train(layer, inputs, targets, lr=1.0, renorm=renorm)
    # the parametrized norms grow (the effective step shrinks); the explicit ones stay 1
    assert (parametrized.weight.flatten(1).norm(dim=1) > 1.01).all()
    torch.testing.assert_close(explicit.weight.flatten(1).norm(dim=1),
                               torch.ones(5, dtype=torch.float64))
    assert not torch.allclose(parametrized(x), explicit(x), atol=1e-3)


def test_rescales_the_conv1d_and_conv3d_rows_keeping_the_function():
    torch.manual_seed(2)
    model = normlab.convert(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Unflatten(1, (3, 1, 1, 3)), nn.Conv3d(3, 4, 1))
                            .double(), "scaled_weight_norm")
    x = torch.randn(2, 2, 5, dtype=torch.float64)
    before = model(x)
    renorm = Renormalize(model)
    assert renorm.layers == [model[0], model[4]]
    renorm.step()
    torch.testing.assert_close(model(x), before)
    for layer in renorm.layers:
        torch.testing.assert_close(layer.weight.flatten(1).norm(dim=1),
                                   torch.ones(len(layer.weight), dtype=torch.float64))


def test_rows_below_the_norm_floor_are_left_alone():
    layer = normlab.WeightNormLinear(3, 2).double()
    with torch.no_grad():
        layer.weight[0] = torch.tensor([1e-13, 0.0, 0.0])  # computed with the floor 1e-12
        layer.weight[1] = torch.tensor([3.0, 0.0, 4.0])
    x = torch.randn(4, 3, dtype=torch.float64)
    before = layer(x)
    Renormalize(layer).step()
    torch.testing.assert_close(layer.weight, torch.tensor([[1e-13, 0.0, 0.0], [0.6, 0.0, 0.8]],
                                                          dtype=torch.float64))
    torch.testing.assert_close(layer(x), before)


def test_refuses_models_without_weight_normalized_layers_and_stateful_optimizers():
    with pytest.raises(ValueError, match="no weight-normalized layer"):
        Renormalize(nn.Sequential(nn.Linear(3, 2)))
    layer = normlab.WeightNormLinear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    companion = Renormalize(layer, optimizer)
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="momentum_buffer"):
        companion.step()


def test_registered_beside_weight_normalizers_only():
    method = registry.get("renorm")
    assert method.family == "rebalancer" and method.rebalancer is Renormalize
    assert training.split_norm("normprop+renorm") == ("normprop", "renorm")
    for spec in ("renorm", "batch+renorm"):
        with pytest.raises(ValueError, match="join it to a weight normalizer"):
            training.split_norm(spec)
    with pytest.raises(ValueError, match="scale-free"):
        training.split_norm("normprop+enorm")
    result = training.train(training.TrainConfig(task="digits-mlp", norm="weight_norm+renorm",
                                                 lr=0.1, batch_size=32, train_limit=256,
                                                 test_limit=64))
    assert result.status == "done"
    for layer in (m for m in result.model.modules() if isinstance(m, nn.Linear)):
        torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(len(layer.weight)))

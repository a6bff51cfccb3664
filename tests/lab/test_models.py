import pytest
import torch
from torch import nn

from normlab import models


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "group"])
def test_mlp_shapes_and_norm_placement(norm):
    model = models.mlp(norm, hidden=32)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert model(torch.randn(5, 784)).shape == (5, 10)
    # the norm sits after the linear layer and before the ReLU
    assert isinstance(model[1], nn.Linear) and isinstance(model[3], nn.ReLU)


def test_fc_cifar_matches_seed_003():
    model = models.fc_cifar(p=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    shapes = [tuple(m.weight.shape) for m in linears]
    assert shapes == [(500, 3072), (500, 500), (500, 500), (500, 500), (10, 500)]
    assert all(m.bias is None for m in linears)
    # He initialization: weight variance 2 / fan_in
    assert linears[1].weight.var().item() == pytest.approx(2 / 500, rel=0.05)
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert model(torch.randn(4, 3072)).shape == (4, 10)
    with pytest.raises(ValueError, match="p"):
        models.fc_cifar(p=-1)


def test_fc_cifar_biases_start_at_zero():
    linears = [m for m in models.fc_cifar(p=1, bias=True).modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    assert all(m.bias is not None and not m.bias.any() for m in linears)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_cifar_resnet(norm):
    model = models.cifar_resnet(depth=8, width=8, norm=norm)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 3 + 2  # stem, 3 blocks of two, 2 projection shortcuts
    assert all((c.bias is None) == (norm != "none") for c in convs)


def test_cifar_resnet_depth_check_and_residual_scale():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.cifar_resnet(depth=10)
    model = models.cifar_resnet(depth=14, width=4, scale_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 6 and all(b.residual_scale == pytest.approx(1 / 6) for b in blocks)


def test_a_weight_normalizer_joined_to_an_activation_normalizer_gets_both():
    """"group+weight_standardization": Weight Standardization's convolutions, each followed
    by GroupNorm (the pairing of Qiao et al. 2019), without conv biases (GroupNorm shifts)."""
    from normlab import WeightStandardizedConv2d

    with pytest.warns(UserWarning, match="8 \\(Linear\\)"):  # the classifier stays plain
        model = models.cifar_resnet(depth=8, width=8, norm="group+weight_standardization")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and all(type(c) is WeightStandardizedConv2d for c in convs)
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 9
    assert models.layer_methods("weight_standardization+group") == (
        "group", "weight_standardization")
    assert models.layer_methods("fastnorm") == ("none", "fastnorm")
    for spec in ("batch+group", "fastnorm+normprop", "batch+enorm"):
        with pytest.raises(ValueError, match="at most one layer normalizer of each family"):
            models.layer_methods(spec)

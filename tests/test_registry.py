import pytest
import torch
from torch import nn

import normlab
from normlab import registry


def small_cnn(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def test_available_lists_torch_norms_first():
    assert normlab.available()[:5] == ["none", "batch", "layer", "group", "instance"]
    for name in normlab.available():
        method = registry.get(name)
        assert method.family in registry.FAMILIES and method.paper


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: none, batch"):
        normlab.create("batchnorm", 8)
    with pytest.raises(ValueError, match="valid names"):
        normlab.convert(small_cnn(), "nope")


SHAPES = [(1, (4, 12)), (1, (4, 12, 5)), (2, (4, 12, 5, 5))]


@pytest.mark.parametrize("name,dim,shape", [
    (name, dim, shape) for name in ["batch", "layer", "group", "instance"]
    for dim, shape in SHAPES])
def test_create_normalizes_each_input_shape(name, dim, shape):
    norm = normlab.create(name, 12, dim=dim)
    y = norm(torch.randn(shape) * 3 + 2)
    assert y.shape == shape
    if name == "batch":
        axes = [0] + list(range(2, len(shape)))
        assert torch.allclose(y.mean(axes), torch.zeros(12), atol=1e-5)
    elif name == "layer":
        assert torch.allclose(y.flatten(1).mean(1), torch.zeros(4), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 3), (1, 1, 1), (4, 3)])
def test_layer_norm_dim_1_normalizes_each_sample_over_channels_and_positions(shape):
    # Found by tests/test_properties.py: nn.LayerNorm(C) refused (N, C, L) and,
    # when L == C, silently normalized over L alone.
    norm = normlab.create("layer", shape[1], dim=1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    axes = tuple(range(1, len(shape)))
    mean, var = x.mean(axes, keepdim=True), x.var(axes, correction=0, keepdim=True)
    affine = (-1,) + (1,) * (len(shape) - 2)
    expected = ((x - mean) / (var + norm.eps).sqrt() * norm.weight.view(affine)
                + norm.bias.view(affine))
    torch.testing.assert_close(norm.double()(x), expected.double())


def test_group_default_is_largest_divisor_at_most_32():
    assert normlab.create("group", 64).num_groups == 32
    assert normlab.create("group", 48).num_groups == 24
    assert normlab.create("group", 64, num_groups=8).num_groups == 8
    with pytest.raises(ValueError, match="must divide"):
        normlab.create("group", 10, num_groups=4)


def test_create_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dim must be 1"):
        normlab.create("batch", 8, dim=3)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        normlab.create("batch", 0)


def test_instance_1d_normalizes_each_sample_not_the_batch():
    # nn.InstanceNorm1d would read (N, C) as one unbatched sample.
    x = torch.randn(6, 4, 10)
    y = normlab.create("instance", 4, dim=1)(x)
    assert torch.allclose(y.mean(-1), torch.zeros(6, 4), atol=1e-5)


@pytest.mark.parametrize("target", ["group", "layer", "instance", "none"])
def test_convert_swaps_every_batchnorm_and_copies_affine(target):
    torch.manual_seed(0)
    model = small_cnn()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1, 1)
    converted = normlab.convert(model, target)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert isinstance(model[1], nn.BatchNorm2d), "the input model must stay unchanged"
    if target != "none":
        assert torch.equal(converted[1].weight, model[1].weight)
        assert torch.equal(converted[1].bias, model[1].bias)
        assert converted[4].num_channels if target != "instance" else converted[4].num_features
    assert converted(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_converted_model_trains():
    torch.manual_seed(0)
    model = normlab.convert(small_cnn(num_classes=2), "group", num_groups=4)
    x = torch.randn(32, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_convert_back_and_forth_keeps_dims():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    as_layer = normlab.convert(model, "layer")
    assert isinstance(as_layer[1], nn.LayerNorm)
    back = normlab.convert(as_layer, "batch")
    assert isinstance(back[1], nn.BatchNorm1d)
    assert back(torch.randn(4, 5)).shape == (4, 2)

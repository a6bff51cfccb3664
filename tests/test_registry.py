import pytest
import torch
from torch import nn

import normlab
from normlab import registry
from normlab.layers.filter_response_norm import FilterResponseNorm3d


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


SHAPES = [(1, (4, 12)), (1, (4, 12, 5)), (2, (4, 12, 5, 5)), (3, (4, 12, 3, 4, 5))]


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


def reference_group_norm(x, groups, eps=1e-5):
    """Each sample's channels split into `groups` consecutive groups, each standardized over
    its channels and positions (Wu and He 2018); layer norm is 1 group, instance norm C."""
    grouped = x.reshape(x.shape[0], groups, -1)
    mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (var + eps).sqrt()).reshape(x.shape)


@pytest.mark.parametrize("name,kw,groups,dim,shape", [
    (name, kw, groups, dim, shape)
    for name, kw, groups in [("group", {}, 24), ("group", {"num_groups": 4}, 4),
                             ("layer", {}, 1), ("instance", {}, 48)]
    # layer with dim=1 on (N, C, L): found by tests/test_properties.py (nn.LayerNorm
    # refused it, or normalized over L alone when L == C)
    for dim, shape in [(1, (5, 48)), (1, (5, 48, 3)), (2, (5, 48, 3, 3)), (3, (5, 48, 2, 2, 3))]])
def test_group_layer_and_instance_outputs_match_the_per_sample_reference(name, kw, groups, dim,
                                                                         shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[1], *[1] * (len(shape) - 2),
                                                             dtype=torch.float64) * 3 + 2
    norm = normlab.create(name, 48, dim=dim, **kw).double()
    with torch.no_grad():  # the per-channel affine, checked too
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    affine = (-1,) + (1,) * (len(shape) - 2)
    expected = (reference_group_norm(x, groups) * norm.weight.view(affine)
                + norm.bias.view(affine))
    torch.testing.assert_close(norm(x), expected, rtol=1e-10, atol=1e-10)


def test_group_default_is_largest_divisor_at_most_32():
    assert normlab.create("group", 64).num_groups == 32
    assert normlab.create("group", 48).num_groups == 24
    assert normlab.create("group", 64, num_groups=8).num_groups == 8
    with pytest.raises(ValueError, match="must divide"):
        normlab.create("group", 10, num_groups=4)


def test_create_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"dim must be 1 .* got 4"):
        normlab.create("batch", 8, dim=4)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        normlab.create("batch", 0)


VOLUME_CLASSES = {"none": nn.Identity, "batch": nn.BatchNorm3d, "layer": nn.GroupNorm,
                  "group": nn.GroupNorm, "instance": nn.InstanceNorm3d,
                  "batch_renorm": normlab.BatchRenorm3d, "online": normlab.OnlineNorm3d,
                  "frn": FilterResponseNorm3d}


def test_every_activation_method_is_named_with_its_3d_class():
    activation = [n for n in normlab.available() if registry.get(n).family == "activation"]
    assert sorted(VOLUME_CLASSES) == sorted(activation)


@pytest.mark.parametrize("name", VOLUME_CLASSES)
def test_create_dim_3_builds_a_layer_for_volumes(name):
    # Batch Renormalization's limits at 1 and 0 make it batch normalization
    kw = {"r_max": 1.0, "d_max": 0.0} if name == "batch_renorm" else {}
    norm = normlab.create(name, 6, dim=3, **kw)
    assert type(norm) is VOLUME_CLASSES[name]
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 2
    y = norm(x)
    assert y.shape == x.shape
    if name in ("batch", "batch_renorm"):  # batch statistics over N, D, H, W per channel
        torch.testing.assert_close(y.mean((0, 2, 3, 4)), torch.zeros(6), atol=1e-5, rtol=0)
    if name == "instance":  # affine, as for images
        assert norm.affine and norm.weight.shape == (6,)


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
        expected_type = {"group": nn.GroupNorm, "layer": nn.GroupNorm,
                         "instance": nn.InstanceNorm2d}[target]
        assert type(converted[4]) is expected_type and registry._num_features(converted[4]) == 32
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


def test_create_and_convert_refuse_the_wrong_family():
    for name, family in (("weight_norm", "weight"), ("equinorm", "weight"),
                         ("enorm", "rebalancer")):
        with pytest.raises(ValueError, match=f"{name!r} is a {family} method, not an "
                                             f"activation normalizer"):
            normlab.create(name, 8)
    with pytest.raises(ValueError, match="'enorm' is a rebalancer.*normlab.ENorm"):
        normlab.convert(small_cnn(), "enorm")


@pytest.mark.parametrize("keep", [False, True])
def test_weight_conversion_keeps_activation_norms_only_when_asked(keep):
    model = small_cnn()
    converted = normlab.convert(model, "weight_norm", keep_activation_norm=keep)
    assert isinstance(converted[0], normlab.WeightNormConv2d)
    assert isinstance(converted[8], normlab.WeightNormLinear)
    for index in (1, 4):
        if keep:
            assert isinstance(converted[index], nn.BatchNorm2d)
            assert converted[index] is not model[index]  # a copy: the input is unchanged
        else:
            assert isinstance(converted[index], nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    expected = model.eval()(x) if keep else model[8](model[6:8](
        model[5](model[3](model[2](model[0](x))))))
    torch.testing.assert_close(converted.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_groupnorm_is_converted_as_2d_unless_dim_says_otherwise():
    model = nn.Sequential(nn.Linear(5, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 2))
    assert isinstance(normlab.convert(model, "batch")[1], nn.BatchNorm2d)
    vectors = normlab.convert(model, "batch", dim=1)
    assert isinstance(vectors[1], nn.BatchNorm1d)
    assert vectors(torch.randn(4, 5)).shape == (4, 2)
    # dim applies to GroupNorm only: a BatchNorm2d stays 2d
    assert isinstance(normlab.convert(small_cnn(), "batch_renorm", dim=1)[1],
                      normlab.BatchRenorm2d)


def test_duplicate_registration_is_refused_and_leaves_the_registry_unchanged(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    original = registry.get("batch")
    duplicate = registry.Method("batch", "activation", "-", "a second batch",
                                build=lambda num_features, dim, **kw: nn.Identity())
    with pytest.raises(ValueError, match="'batch' is already registered"):
        registry.register(duplicate)
    assert registry.get("batch") is original
    new = registry.register(registry.Method("identity2", "activation", "-", "another identity",
                                            build=duplicate.build))
    assert registry.get("identity2") is new and normlab.available()[-1] == "identity2"


CONVERTIBLE = [name for name in normlab.available() if registry.get(name).family != "rebalancer"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("target", CONVERTIBLE)
def test_convert_keeps_the_models_dtype_and_mode(target, training, dtype):
    torch.manual_seed(0)
    model = small_cnn().to(dtype).train(training)
    converted = normlab.convert(model, target)
    assert all(m.training == training for m in converted.modules())
    assert {p.dtype for p in converted.parameters()} == {dtype}
    x = torch.rand(4, 3, 8, 8, dtype=dtype)
    out = converted(x)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_convert_keeps_the_device_of_a_meta_model():
    model = small_cnn().to("meta")
    for target in ("batch_renorm", "online", "group", "weight_norm", "equinorm"):
        converted = normlab.convert(model, target)
        assert {t.device.type for t in (*converted.parameters(), *converted.buffers())} == {
            "meta"}, target


def test_every_registered_methods_classes_are_public_by_name():
    classes = [cls for name in registry.available() for cls in registry.get(name).classes]
    assert normlab.FilterResponseNorm2d in classes and normlab.ENorm in classes
    assert normlab.FastNormSGD in registry.get("fastnorm").classes
    assert registry.get("batch").classes == ()  # torch's own layer
    for cls in classes:
        assert getattr(normlab, cls.__name__) is cls and cls.__name__ in normlab.__all__

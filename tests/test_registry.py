import warnings

import pytest
import torch
from torch import nn

import normlab
from conftest import monai_basic_unet
from normlab import registry
from normlab.layers.filter_response_norm import FilterResponseNorm1d, FilterResponseNorm3d


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


def test_groupnorm_takes_the_dim_of_the_layer_before_it_unless_dim_says_otherwise():
    model = nn.Sequential(nn.Linear(5, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 2))
    vectors = normlab.convert(model, "batch")
    assert isinstance(vectors[1], nn.BatchNorm1d)
    assert vectors(torch.randn(4, 5)).shape == (4, 2)
    assert isinstance(normlab.convert(model, "batch", dim=2)[1], nn.BatchNorm2d)
    images = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
    assert isinstance(normlab.convert(images, "batch")[1], nn.BatchNorm2d)
    assert isinstance(normlab.convert(nn.Sequential(nn.GroupNorm(2, 8)), "batch")[0],
                      nn.BatchNorm2d), "nothing before it: 2d"
    # dim applies to the classes that fix none: a BatchNorm2d stays 2d
    assert isinstance(normlab.convert(small_cnn(), "batch_renorm", dim=1)[1],
                      normlab.BatchRenorm2d)
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        normlab.convert(model, "batch", dim=4)


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


class PlainSubclass(nn.BatchNorm2d):
    """A subclass that adds no step: it converts as a BatchNorm2d."""


class BatchNormAct2d(nn.BatchNorm2d):
    """A stand-in for timm's BatchNormAct2d: batch norm, then an activation."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def create_takes_dim_3() -> bool:
    try:
        normlab.create("batch", 4, dim=3)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("model,shape,expected", [
    (nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Conv1d(4, 4, 1),
                   nn.InstanceNorm1d(4, affine=True), nn.Conv1d(4, 4, 1), nn.SyncBatchNorm(4),
                   nn.Conv1d(4, 4, 1), normlab.OnlineNorm1d(4)),
     (2, 3, 5), [normlab.BatchRenorm1d] * 4),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), PlainSubclass(4),
                   nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4), nn.InstanceNorm2d(4),
                   nn.GroupNorm(2, 4), normlab.OnlineNorm2d(4), normlab.BatchRenorm2d(4)),
     (2, 3, 5, 5), [normlab.BatchRenorm2d] * 7),
    (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.SyncBatchNorm(4),
                   nn.Linear(4, 4), FilterResponseNorm1d(4)),
     (6, 3), [normlab.BatchRenorm1d] * 3),
], ids=["1d", "2d", "vectors"])
def test_convert_finds_every_normalizer_and_subclass_with_the_dim_before_it(model, shape,
                                                                             expected):
    converted = normlab.convert(model, "batch_renorm")
    norms = [m for m in converted if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    assert [type(m) for m in norms] == expected
    assert converted(torch.randn(shape)).shape[:2] == (shape[0], 4)


@pytest.mark.skipif(not create_takes_dim_3(),
                    reason="needs create(name, C, dim=3), which the nd branch adds")
def test_convert_a_3d_model_to_a_torch_normalizer():
    model = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 1),
                          nn.InstanceNorm3d(4), nn.Conv3d(4, 4, 1), nn.SyncBatchNorm(4),
                          nn.GroupNorm(2, 4))
    converted = normlab.convert(model, "batch")
    assert [type(m) for m in converted if type(m) is not nn.Conv3d] == [nn.BatchNorm3d] * 4
    for target in ("group", "instance"):
        out = normlab.convert(model, target)(torch.randn(2, 2, 3, 3, 3))
        assert out.shape == (2, 4, 3, 3, 3) and torch.isfinite(out).all()


def test_a_subclass_that_overrides_forward_is_refused_unless_registered(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4))
    with pytest.raises(ValueError, match="test_registry.BatchNormAct2d overrides the forward "
                                         "of BatchNorm2d"):
        normlab.convert(model, "group")
    with pytest.raises(ValueError, match="BatchNormAct2d overrides"):
        normlab.convert(model, "weight_norm")  # dropping it would drop the activation too
    monkeypatch.setattr(normlab.module_kinds, "_EXTRA_STEPS", {})
    normlab.register_norm_subclass(BatchNormAct2d, lambda m: [m.act])
    for target in ("batch", "group"):
        converted = normlab.convert(model, target)
        assert [type(m) for m in converted[1]] == [
            {"batch": nn.BatchNorm2d, "group": nn.GroupNorm}[target], nn.ReLU]
    x = torch.randn(4, 3, 5, 5)
    # the same function: in training, batch norm uses the batch's statistics
    torch.testing.assert_close(normlab.convert(model, "batch")(x), model(x))
    assert type(normlab.convert(model, "weight_norm")[1]) is nn.ReLU
    with pytest.raises(TypeError, match="an nn.Module subclass"):
        normlab.register_norm_subclass(object, lambda m: [])


def test_weight_target_replaces_subclasses_and_lists_what_it_cannot_in_one_warning():
    class PlainLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 2), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Sequential(PlainLinear(4 * 36, 5)),
                          nn.Bilinear(5, 5, 5), nn.Conv3d(1, 1, 1))
    with pytest.warns(UserWarning) as record:
        converted = normlab.convert(model, "weight_norm")
    assert len(record) == 1
    assert str(record[0].message) == (
        "convert(model, 'weight_norm') left 2 layer(s) with weights that weight_norm cannot "
        "replace as they are: 1 (ConvTranspose2d), 5 (Bilinear)")
    assert type(converted[0]) is normlab.WeightNormConv2d
    assert type(converted[6]) is normlab.WeightNormConv3d
    assert type(converted[4][0]) is normlab.WeightNormLinear
    assert type(converted[1]) is nn.ConvTranspose2d and type(converted[2]) is nn.Identity
    with pytest.raises(ValueError, match="ScaledLinear overrides the forward of Linear"):
        normlab.convert(nn.Sequential(ScaledLinear(3, 3)), "weight_norm")


def test_a_lazy_module_before_its_first_forward_is_an_error_and_after_it_converts():
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match=r"lazy modules.*: 0 \(LazyLinear\), 1 "
                                         r"\(LazyBatchNorm1d\); run one forward pass"):
        normlab.convert(model, "group")
    model(torch.randn(3, 2))
    assert type(normlab.convert(model, "batch_renorm")[1]) is normlab.BatchRenorm1d


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_convert_finds_monai_basic_unets_normalizers(norm):
    torch.manual_seed(0)
    net = monai_basic_unet(2, norm)
    torch_class = {"instance": nn.InstanceNorm2d, "batch": nn.BatchNorm2d}[norm]
    count = sum(isinstance(m, torch_class) for m in net.modules())
    assert count == 18
    converted = normlab.convert(net, "batch_renorm")
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(normlab.BatchRenorm2d) == count and torch_class not in kinds
    with pytest.warns(UserWarning, match=r"left 4 layer\(s\).*upcat_4.upsample.deconv "
                                         r"\(ConvTranspose2d\)") as record:
        weight_normalized = normlab.convert(net, "weight_norm", keep_activation_norm=True)
    assert len(record) == 1
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(weight_normalized.eval()(x), net.eval()(x), rtol=1e-5,
                               atol=1e-5)


WEIGHT_CLASSES = [cls for name in normlab.available()
                  for cls in registry.get(name).replaces.values()]


@pytest.mark.parametrize("cls", WEIGHT_CLASSES, ids=lambda cls: cls.__name__)
def test_from_module_takes_subclasses_that_keep_the_forward_only(cls):
    plain = cls.plain_type
    args = (4, 3) if plain is nn.Linear else (4, 3, 1)
    keeps = type("Keeps", (plain,), {})(*args)
    assert isinstance(cls.from_module(keeps), cls)
    overrides = type("Overrides", (plain,), {"forward": lambda self, x: 2 * plain.forward(self, x)})
    message = f"expects an nn.{plain.__name__}, got Overrides, a subclass that overrides"
    with pytest.raises(TypeError, match=message):
        cls.from_module(overrides(*args))


# -- convert(model, "frn"): FRN's TLU takes the place of the ReLU after the normalizer --

def frn_outputs_with_and_without_the_relu(model, x):
    """The converted model's output, and that of the same model with each FilterResponseNorm's
    output put through a ReLU (what keeping the ReLUs would compute)."""
    from normlab.layers.filter_response_norm import FilterResponseNorm2d

    converted = normlab.convert(model, "frn")
    with_relu = nn.Sequential(*[nn.Sequential(m, nn.ReLU()) if isinstance(
        m, FilterResponseNorm2d) else m for m in converted])
    return converted, converted(x), with_relu(x)


def test_convert_to_frn_drops_the_relu_each_normalizer_fed_alone():
    torch.manual_seed(0)
    # the second ReLU after a dropout, which scales by factors >= 0: a ReLU before it
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.5),
                          nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4),
                          nn.LeakyReLU())
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every ReLU here can be told: no warning
        converted, out, reference = frn_outputs_with_and_without_the_relu(model.eval(), x)
    assert [type(m).__name__ for m in converted] == [
        "Conv2d", "FilterResponseNorm2d", "Identity", "Conv2d", "FilterResponseNorm2d",
        "Dropout", "Identity", "Conv2d", "FilterResponseNorm2d", "LeakyReLU"]  # only ReLUs
    torch.testing.assert_close(out, reference)  # tau = 0: the TLU is the ReLU it replaces
    with torch.no_grad():
        converted[1].tau.fill_(-0.5)  # a learned threshold below 0 now acts
    assert (converted[:2](x) < 0).any()
    assert isinstance(normlab.convert(model, "group")[2], nn.ReLU)  # other methods keep it


def test_convert_to_frn_keeps_a_relu_it_cannot_replace_alone_and_says_so():
    class SharedRelu(nn.Module):  # torchvision's BasicBlock: one ReLU module, two calls
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.relu(x + self.relu(self.bn(self.conv(x))))

    class FunctionalRelu(SharedRelu):
        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class Untraceable(nn.Module):  # control flow on a value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.tail = SharedRelu()

        def forward(self, x):
            return self.tail(self.body(x)) if x.sum() > 0 else x

    for model, where in ((SharedRelu(), "after bn"), (FunctionalRelu(), "after bn")):
        with pytest.warns(UserWarning, match=f"the activation {where} stays"):
            converted = normlab.convert(model, "frn")
        assert isinstance(converted.relu, nn.ReLU)
    with pytest.warns(UserWarning) as record:
        converted = normlab.convert(Untraceable(), "frn")
    messages = " ".join(str(w.message) for w in record)
    assert "cannot trace the model (Untraceable" in messages
    assert "the activation after tail.bn stays" in messages
    assert isinstance(converted.body[2], nn.Identity)  # inside what it can trace: replaced

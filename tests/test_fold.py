import pytest
import torch
from torch import nn

import normlab
from conftest import monai_basic_unet
from normlab import registry
from normlab.layers._base import ActivationNorm

PLAIN = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Hardtanh, nn.Flatten, nn.AdaptiveAvgPool2d,
         nn.Sequential)

# (layer, input shape): layers in settings that matter to their plain form ...
CHOSEN_WEIGHT_LAYERS = [
    (lambda: normlab.WeightNormLinear(6, 5), (4, 6)),
    (lambda: normlab.WeightNormConv2d(3, 4, 3, stride=2, groups=1), (2, 3, 7, 7)),
    (lambda: normlab.ScaledWeightNormLinear(6, 5, nonlinearity="linear"), (4, 6)),
    (lambda: normlab.ScaledWeightNormConv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    (lambda: normlab.NormPropLinear(6, 5, bias=False), (4, 6)),
    (lambda: normlab.NormPropConv2d(3, 4, 3, padding=1, bias=False), (2, 3, 5, 5)),
    (lambda: normlab.NormPropConv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 5, 5)),
    (lambda: normlab.EquiNormLinear(6, 5), (4, 6)),
    (lambda: normlab.EquiNormConv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
    (lambda: normlab.EquiNormConv2d(3, 4, 3, padding=1, padding_mode="circular"), (2, 3, 5, 5)),
    (lambda: normlab.FastNormLinear(6, 5), (4, 6)),
    (lambda: normlab.FastNormConv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
]


def _default_example(cls):
    """A `cls` with default settings, on an input it takes."""
    if cls.plain_type is nn.Linear:
        return (lambda: cls(6, 5)), (4, 6)
    spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[cls.plain_type]
    return (lambda: cls(3, 4, 3, padding=1)), (2, 3) + (5,) * spatial


# ... and every other weight-family class of the registry with its defaults
_CHOSEN_CLASSES = {type(make()) for make, _ in CHOSEN_WEIGHT_LAYERS}
WEIGHT_LAYERS = CHOSEN_WEIGHT_LAYERS + [
    _default_example(cls) for name in normlab.available()
    for cls in registry.get(name).replaces.values() if cls not in _CHOSEN_CLASSES]


def randomized(layer):
    """Gains, biases, affines and running statistics away from their initial values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
        for name, buffer in layer.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return layer


@torch.no_grad()
def assert_same_function(folded, model, x):
    expected = model.eval()(x)
    torch.testing.assert_close(folded(x), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("make,shape", WEIGHT_LAYERS)
def test_to_plain_is_a_torch_layer_with_the_eval_function(make, shape):
    torch.manual_seed(0)
    layer = randomized(make()).eval()
    plain = layer.to_plain()
    assert type(plain) is type(layer).plain_type
    assert_same_function(plain, layer, torch.rand(shape) + 0.1)


def test_normprop_without_bias_gets_the_bias_its_standardization_needs():
    layer = normlab.NormPropLinear(6, 5, bias=False)
    plain = layer.to_plain()
    assert layer.bias is None and plain.bias is not None
    # the ReLU mean's contribution: -mean * gain' * sum(w) / ||w||
    gain = layer.gain / normlab.layers.weight_norm.RELU_GAUSSIAN_STD
    unit = layer.weight / layer.weight.norm(dim=1, keepdim=True)
    expected = -normlab.layers.weight_norm.RELU_GAUSSIAN_MEAN * gain * unit.sum(1)
    torch.testing.assert_close(plain.bias, expected.detach())


def test_strided_equinorm_needs_the_input_size_which_an_example_input_gives():
    torch.manual_seed(0)
    layer = randomized(normlab.EquiNormConv2d(3, 4, 3, stride=2))
    with pytest.raises(ValueError, match="depends on the input size; pass input_size"):
        layer.to_plain()
    model = nn.Sequential(layer, nn.ReLU())
    x = torch.rand(2, 3, 9, 9)
    folded = normlab.fold(model, example_input=x)
    assert type(folded[0]) is nn.Conv2d
    assert_same_function(folded, model, x)


def network():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        normlab.WeightNormConv2d(8, 8, 3, padding=1, bias=False), normlab.BatchRenorm2d(8),
        nn.ReLU(),
        nn.Sequential(normlab.NormPropConv2d(8, 8, 3, padding=1), normlab.OnlineNorm2d(8),
                      nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        normlab.EquiNormLinear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 10), normlab.OnlineNorm1d(10, ecm=None),
    )


def test_fold_leaves_plain_layers_computing_the_eval_function():
    torch.manual_seed(0)
    model = randomized(network())
    folded = normlab.fold(model)
    assert all(isinstance(m, PLAIN) for m in folded.modules()), folded
    assert isinstance(getattr(folded, "6")[1], nn.Hardtanh)  # OnlineNorm's "ac" clamp stays
    assert list(folded._modules) == ["0", "2", "3", "5", "6", "7", "8", "9", "11", "12"]
    assert not folded.training and model.training, "a copy in eval mode; the input unchanged"
    assert_same_function(folded, model, torch.rand(4, 3, 6, 6))


def test_fold_a_converted_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10))
    converted = randomized(normlab.convert(model, "scaled_weight_norm",
                                           keep_activation_norm=True))
    folded = normlab.fold(converted)
    assert [type(m) for m in folded] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    assert_same_function(folded, converted, torch.rand(2, 3, 6, 6))


class TwoUsers(nn.Module):  # the conv's output also feeds the sum
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return y + self.bn(y)


class CalledTwice(nn.Module):  # one conv, two call sites
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class ReadsTheWeight(nn.Module):  # forward reads the conv's weight itself
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.sum()


class Aliased(nn.Module):  # one batch norm under two names; forward calls the second
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.same_bn = self.bn

    def forward(self, x):
        return self.same_bn(self.conv(x))


class ReachedTwice(nn.Module):  # one block on two paths (MONAI's DynUNet): still one call
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.chain = nn.ModuleDict({"first": self.block})

    def forward(self, x):
        return self.chain["first"](x)


def test_a_block_reached_by_two_paths_folds():
    model = randomized(ReachedTwice())
    folded = normlab.fold(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.block is folded.chain["first"]
    assert_same_function(folded, model, torch.rand(3, 4, 5, 5))


def test_what_is_not_foldable_stays_in_eval_mode():
    torch.manual_seed(0)
    class BatchNormPlusOne(nn.BatchNorm2d):  # overrides forward: its own computation
        def forward(self, x):
            return super().forward(x) + 1

    hooked = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    hooked[0].register_forward_hook(lambda module, args, out: out * 2)
    model = randomized(nn.Sequential(
        TwoUsers(), CalledTwice(), ReadsTheWeight(), Aliased(), hooked,
        nn.Conv2d(4, 4, 1), BatchNormPlusOne(4),
        nn.Conv2d(4, 4, 1), normlab.OnlineNorm2d(4, ecm="ls"),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(), nn.BatchNorm2d(4)))  # after a ReLU: nothing to fold into
    folded = normlab.fold(model)
    kinds = [type(m) for m in folded.modules()]
    assert kinds.count(nn.BatchNorm2d) == 7 and normlab.OnlineNorm2d in kinds
    assert BatchNormPlusOne in kinds
    assert not any(m.training for m in folded.modules())
    assert_same_function(folded, model, torch.rand(3, 4, 5, 5))


class Block(nn.Module):
    """A residual block that calls its modules from forward."""

    def __init__(self, conv, norm):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x):
        return x + self.norm(self.conv(x))


@pytest.mark.parametrize("conv,norm,shape", [
    (nn.Conv1d(3, 3, 3, padding=1), normlab.BatchRenorm1d(3), (2, 3, 7)),
    (nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), (2, 3, 5, 5)),
    (nn.Conv3d(3, 3, 3, padding=1), nn.BatchNorm3d(3), (2, 3, 4, 5, 3)),
    (nn.Linear(3, 3), normlab.OnlineNorm1d(3, ecm=None), (4, 3)),
    (nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3), (2, 3, 4, 4)),
], ids=["conv1d-batch_renorm", "conv2d-batch", "conv3d-batch", "linear-online", "conv2d-sync"])
def test_fold_a_normalizer_called_from_forward_in_any_dim(conv, norm, shape):
    torch.manual_seed(0)
    model = randomized(Block(conv, norm))
    folded = normlab.fold(model)
    assert type(folded) is Block and type(folded.norm) is nn.Identity
    assert type(folded.conv) is type(conv)
    assert_same_function(folded, model, torch.randn(shape))


@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "online"])
def test_folded_cifar_resnet20_holds_no_normalizer_and_computes_the_same(norm):
    torch.manual_seed(0)
    model = normlab.models.cifar_resnet(20, norm=norm)
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    folded = normlab.fold(model)
    kinds = {type(m) for m in folded.modules()}
    assert not any(issubclass(kind, (nn.modules.batchnorm._NormBase, ActivationNorm))
                   for kind in kinds), kinds
    assert (nn.Hardtanh in kinds) == (norm == "online")  # Online Norm's "ac" clamp stays
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-5)


class Untraceable(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.inner = Block(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.features(x)
        return self.inner(x) if x.sum() > 0 else -x


def test_an_untraceable_model_is_folded_inside_its_traceable_parts_with_a_warning():
    torch.manual_seed(0)
    model = randomized(Untraceable())
    with pytest.warns(UserWarning, match=r"fold: torch.fx cannot trace the model "
                                         r"\(Untraceable: TraceError: .*\); the normalizers "
                                         r"were folded inside the submodules it can trace"):
        folded = normlab.fold(model)
    assert [type(m) for m in folded.features] == [nn.Conv2d, nn.ReLU]
    assert type(folded.inner.norm) is nn.Identity
    assert_same_function(folded, model, torch.rand(2, 3, 4, 4))


def test_fold_monai_basic_unet():
    torch.manual_seed(0)
    model = monai_basic_unet(2, "batch")
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 1, 32, 32) * 2 + 1)
    folded = normlab.fold(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert_same_function(folded, model, torch.randn(2, 1, 32, 32))


SCALE = torch.tensor(2.0)


class ScaledBlock(Block):
    """Its forward reads a tensor that is no attribute, which torch.fx records as one."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        return super().forward(x) * SCALE


def test_fold_leaves_no_tracing_attribute_behind():
    torch.manual_seed(0)
    model = randomized(ScaledBlock())
    folded = normlab.fold(model)
    assert type(folded.norm) is nn.Identity
    assert set(vars(folded)) == set(vars(model))
    assert_same_function(folded, model, torch.randn(2, 3, 4, 4))

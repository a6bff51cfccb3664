import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normlab
from normlab import models
from normlab.layers.weight_norm import (
    RELU_GAUSSIAN_MEAN,
    RELU_GAUSSIAN_STD,
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropLinear,
    ScaledWeightNormConv1d,
    ScaledWeightNormConv2d,
    ScaledWeightNormConv3d,
    ScaledWeightNormLinear,
    WeightNormConv1d,
    WeightNormConv2d,
    WeightNormConv3d,
    WeightNormLinear,
)
from normlab.training import TrainConfig, train

LINEARS = [WeightNormLinear, ScaledWeightNormLinear, NormPropLinear]
CONVS = [WeightNormConv2d, ScaledWeightNormConv2d, NormPropConv2d]
# spatial dims -> the convolutions of each method, in the order of LINEARS
CONVS_BY_DIMS = {1: [WeightNormConv1d, ScaledWeightNormConv1d, NormPropConv1d], 2: CONVS,
                 3: [WeightNormConv3d, ScaledWeightNormConv3d, NormPropConv3d]}
ALL_CONVS = [cls for convs in CONVS_BY_DIMS.values() for cls in convs]
FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# an input size per spatial dims: unequal sides, so that a transposed position would show
POSITIONS = {1: (9,), 2: (9, 8), 3: (7, 6, 5)}
METHOD_KW = [  # every constant factor and standardization the classes offer
    (WeightNormLinear, {}), (ScaledWeightNormLinear, {"nonlinearity": "relu"}),
    (ScaledWeightNormLinear, {"nonlinearity": "linear"}),
    (NormPropLinear, {"input_activation": "relu"}), (NormPropLinear, {"input_activation": None}),
]


def conv_of(linear_cls, dims=2):
    return CONVS_BY_DIMS[dims][LINEARS.index(linear_cls)]


def images(batch, channels, dims, size=None, **kw):
    """A random (batch, channels, *positions) input of `dims` spatial dims, float64."""
    positions = POSITIONS[dims] if size is None else (size,) * dims
    return torch.randn(batch, channels, *positions, dtype=torch.float64, **kw)


def randomize(layer, seed=0):
    """Gains and biases away from their 1 / 0 initialization, so that they matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2.0)
        if layer.bias is not None:
            layer.bias.uniform_(-1.0, 1.0)
    return layer


def expected_factor(layer):
    """The constant factor, from the lecture's formulas."""
    if getattr(layer, "nonlinearity", None) is None:
        return 1.0
    k = {"relu": 2.0, "linear": 1.0}[layer.nonlinearity]
    if hasattr(layer, "in_channels"):
        return math.sqrt(k * layer.in_channels / layer.out_channels)
    return math.sqrt(k * layer.in_features / layer.out_features)


def standardize(x, layer):
    if getattr(layer, "input_activation", None) == "relu":
        return (x - RELU_GAUSSIAN_MEAN) / RELU_GAUSSIAN_STD
    return x


def reference_linear(layer, x):
    """z_i = factor * gain_i * sum_k w_ik x~_k / sqrt(sum_k w_ik^2) + bias_i, unit by unit."""
    x = standardize(x, layer)
    columns = []
    for i, w in enumerate(layer.weight):
        z = expected_factor(layer) * layer.gain[i] * (x @ w) / torch.sqrt((w * w).sum())
        columns.append(z + (layer.bias[i] if layer.bias is not None else 0))
    return torch.stack(columns, -1)


def reference_conv(layer, x):
    """Pad x, standardize it (padding included), convolve with unit-norm kernels."""
    pad = [p for p in reversed(layer.padding) for _ in range(2)]  # last dim first, as F.pad
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = standardize(F.pad(x, pad, mode=mode), layer)
    kernels = torch.stack([layer.gain[c] * w / torch.sqrt((w * w).sum())
                           for c, w in enumerate(layer.weight)])
    return FUNCTIONAL_CONV[len(layer.padding)](x, expected_factor(layer) * kernels, layer.bias,
                                               layer.stride, 0, layer.dilation, layer.groups)


@pytest.mark.parametrize("cls,kw", METHOD_KW)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_the_reference(cls, kw, bias):
    layer = randomize(cls(7, 5, bias=bias, dtype=torch.float64, **kw))
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    assert torch.allclose(layer(x), reference_linear(layer, x), atol=1e-12)


CONV_GEOMETRIES = [  # (spatial dims, geometry): each in 1, 2 and 3 dims, one 2-D anisotropic
    (dims, geometry) for geometry in (
        dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=2, padding_mode="circular"),
        dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, groups=2, dilation=2, bias=False))
    for dims in (1, 2, 3)] + [
    (2, dict(kernel_size=(3, 1), stride=2, padding=(1, 0), padding_mode="reflect"))]


@pytest.mark.parametrize("cls,kw", METHOD_KW)
@pytest.mark.parametrize("dims,geometry", CONV_GEOMETRIES)
def test_conv_matches_the_reference(cls, kw, dims, geometry):
    layer = randomize(conv_of(cls, dims)(4, 6, dtype=torch.float64, **geometry, **kw))
    x = images(2, 4, dims)
    assert torch.allclose(layer(x), reference_conv(layer, x), atol=1e-12)
    assert torch.allclose(layer(x[0]), reference_conv(layer, x[:1])[0], atol=1e-12)


@pytest.mark.parametrize("cls,kw", METHOD_KW)
@pytest.mark.parametrize("bias", [True, False])
def test_from_module_computes_the_source_layers_function(cls, kw, bias):
    torch.manual_seed(1)
    linear = nn.Linear(9, 6, bias=bias).double()
    x = torch.randn(5, 9, dtype=torch.float64)
    layer = cls.from_module(linear, **kw)
    assert torch.allclose(layer(x), linear(x), rtol=1e-12, atol=1e-13)
    for dims in (1, 2, 3):
        conv = TORCH_CONV[dims](3, 8, 3, stride=2, padding=1, bias=bias).double()
        x = images(2, 3, dims)
        layer = conv_of(cls, dims).from_module(conv, **kw)
        assert torch.allclose(layer(x), conv(x), rtol=1e-12, atol=1e-13)
        assert torch.allclose(layer.to_plain()(x), conv(x), rtol=1e-12, atol=1e-13)
        assert type(layer.to_plain()) is type(conv)
        assert layer.weight is not conv.weight, "the source layer must stay independent"


def test_from_module_keeps_geometry_dtype_and_rejects_other_layers():
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=1, groups=2,
                     padding_mode="replicate", dtype=torch.float64)
    layer = ScaledWeightNormConv2d.from_module(conv, nonlinearity="linear")
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr)
    assert layer.weight.dtype == torch.float64 and layer.nonlinearity == "linear"
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv2d"):
        WeightNormLinear.from_module(conv)
    with pytest.raises(TypeError, match="expects an nn.Conv2d, got Linear"):
        NormPropConv2d.from_module(nn.Linear(3, 4))
    conv3d = nn.Conv3d(2, 4, (3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1),
                       padding_mode="circular", dtype=torch.float64)
    layer = WeightNormConv3d.from_module(conv3d)
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, attr) == getattr(conv3d, attr)
    with pytest.raises(TypeError, match="expects an nn.Conv1d, got Conv3d"):
        WeightNormConv1d.from_module(conv3d)
    with pytest.raises(TypeError, match="expects an nn.Conv3d, got Conv2d"):
        ScaledWeightNormConv3d.from_module(conv)


def test_normprop_from_a_biasless_layer_gets_the_bias_its_shift_needs():
    linear = nn.Linear(6, 4, bias=False).double()
    layer = NormPropLinear.from_module(linear)
    x = torch.relu(torch.randn(3, 6, dtype=torch.float64))
    assert layer.bias is not None and torch.allclose(layer(x), linear(x))
    assert NormPropLinear.from_module(linear, input_activation=None).bias is None


@pytest.mark.parametrize("cls", LINEARS)
def test_gradcheck_float64(cls):
    linear = randomize(cls(4, 3, dtype=torch.float64))
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = (linear.weight, linear.gain, linear.bias)
    assert torch.autograd.gradcheck(
        lambda x, w, g, b: torch.func.functional_call(
            linear, {"weight": w, "gain": g, "bias": b}, (x,)), (x, *params))
    for dims in (1, 2, 3):
        conv = randomize(conv_of(cls, dims)(2, 2, 2, padding=1, dtype=torch.float64))
        x = images(1, 2, dims, size=3, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, g, b, conv=conv: torch.func.functional_call(
                conv, {"weight": w, "gain": g, "bias": b}, (x,)),
            (x, conv.weight, conv.gain, conv.bias))


@pytest.mark.parametrize("layer", [WeightNormLinear(20, 8, dtype=torch.float64),
                                   NormPropLinear(20, 8, dtype=torch.float64),
                                   WeightNormConv1d(3, 8, 3, dtype=torch.float64),
                                   WeightNormConv2d(3, 8, 3, dtype=torch.float64),
                                   NormPropConv3d(3, 8, 3, dtype=torch.float64)])
def test_weight_gradient_is_orthogonal_to_each_row(layer):
    randomize(layer)
    x = torch.randn(6, 20, dtype=torch.float64) if isinstance(layer, nn.Linear) else \
        images(6, 3, layer.spatial_dims(), size=5)
    (layer(x) * torch.randn_like(layer(x))).sum().backward()
    rows, grads = layer.weight.flatten(1), layer.weight.grad.flatten(1)
    assert grads.norm(dim=1).min() > 1e-3, "a zero gradient would be orthogonal trivially"
    cosines = (rows * grads).sum(1) / (rows.norm(dim=1) * grads.norm(dim=1))
    assert cosines.abs().max() < 1e-12


@pytest.mark.parametrize("cls,kw", METHOD_KW)
def test_data_init_gives_zero_mean_unit_variance_per_unit(cls, kw):
    torch.manual_seed(0)
    x = torch.rand(256, 30, dtype=torch.float64) * 3 + 1  # far from standardized
    layer = cls(30, 12, dtype=torch.float64, **kw)
    z = layer.data_init(x)
    assert torch.allclose(z, layer(x))
    assert torch.allclose(z.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.var(0, correction=0), torch.ones(12, dtype=torch.float64))
    for dims in (1, 2, 3):
        conv = conv_of(cls, dims)(3, 5, 3, padding=1, dtype=torch.float64, **kw)
        z = conv.data_init(torch.rand(16, 3, *(5,) * dims, dtype=torch.float64) * 2 - 0.3)
        positions = (0, *range(2, 2 + dims))
        assert torch.allclose(z.mean(positions), torch.zeros(5, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(z.var(positions, correction=0), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("cls,kw", METHOD_KW)
@pytest.mark.parametrize("dims", [1, 3])
def test_effective_kernels_have_the_gain_as_row_norm_in_1d_and_3d(cls, kw, dims):
    """Each output channel's effective kernel (to_plain's) has norm factor * gain / std,
    whatever the stored direction's norm."""
    layer = randomize(conv_of(cls, dims)(3, 5, 3, dtype=torch.float64, **kw))
    with torch.no_grad():
        layer.weight.mul_(torch.rand(5, *[1] * (dims + 1), dtype=torch.float64) * 5 + 0.1)
    std = RELU_GAUSSIAN_STD if kw.get("input_activation") == "relu" else 1.0
    expected = expected_factor(layer) * layer.gain.detach() / std
    torch.testing.assert_close(layer.to_plain().weight.flatten(1).norm(dim=1), expected,
                               rtol=1e-12, atol=0)


def test_data_init_leaves_a_constant_unit_finite_and_needs_a_bias():
    layer = WeightNormLinear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight[1] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    x = torch.randn(32, 4, dtype=torch.float64)
    x[:, 3] = 2.0  # unit 1 sees a constant
    z = layer.data_init(x)
    assert torch.isfinite(z).all() and layer.gain[1] == 1.0
    assert torch.allclose(z[:, 1], torch.zeros(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs a bias"):
        WeightNormLinear(4, 3, bias=False).data_init(x.float())


@pytest.mark.parametrize("nonlinearity,k", [("relu", 2), ("linear", 1)])
def test_scaled_layers_multiply_weight_norm_by_the_lectures_factor(nonlinearity, k):
    # fan_in / fan_out: 300 / 100 for the linear layer, (8 * 3^d) / (32 * 3^d) for the convs
    for scaled, plain, x, fan_ratio in (
            (ScaledWeightNormLinear(300, 100, nonlinearity=nonlinearity),
             WeightNormLinear(300, 100), torch.randn(4, 300), 300 / 100),
            *((CONVS_BY_DIMS[dims][1](8, 32, 3, nonlinearity=nonlinearity),
               CONVS_BY_DIMS[dims][0](8, 32, 3), images(2, 8, dims, size=5).float(), 8 / 32)
              for dims in (1, 2, 3))):
        plain.load_state_dict(scaled.state_dict())
        assert torch.allclose(scaled(x), math.sqrt(k * fan_ratio) * plain(x), atol=1e-5)


def test_scaled_relu_mlp_preserves_norms_at_initialization():
    """The lecture's claim: depth 20, width 1000, ||f(x)|| / ||x|| near 1, and
    per-layer weight-gradient norms within a factor 2 of each other."""
    torch.manual_seed(0)
    layers = [m for _ in range(20) for m in (ScaledWeightNormLinear(1000, 1000), nn.ReLU())]
    net = nn.Sequential(*layers)
    x = torch.randn(64, 1000)
    out = net(x)
    ratios = out.norm(dim=1) / x.norm(dim=1)
    # E||v||^2 = ||u||^2 is the claim: the root mean square over inputs checks it
    rms = ratios.pow(2).mean().sqrt().item()
    (out * torch.randn_like(out)).sum().backward()
    grad_norms = torch.stack([m.weight.grad.norm() for m in net if isinstance(m, nn.Linear)])
    spread = (grad_norms.max() / grad_norms.min()).item()
    print(f"\n||f(x)||/||x||: rms {rms:.3f}, median {ratios.median():.3f}, per input "
          f"[{ratios.min():.3f}, {ratios.max():.3f}], inside [0.8, 1.25]: "
          f"{((ratios >= 0.8) & (ratios <= 1.25)).float().mean():.0%}; "
          f"weight-gradient norms max/min over 20 layers: {spread:.3f}")
    assert 0.8 <= rms <= 1.25 and 0.8 <= ratios.median() <= 1.25
    assert spread < 2
    # plain WeightNorm (factor 1) halves E||v||^2 at each layer: 2^-10 after 20
    plain = nn.Sequential(*[m for _ in range(20) for m in (WeightNormLinear(1000, 1000),
                                                            nn.ReLU())])
    with torch.no_grad():
        plain_rms = (plain(x).norm(dim=1) / x.norm(dim=1)).pow(2).mean().sqrt().item()
    assert 2**-11 < plain_rms < 2**-9


def test_normprop_constants_are_the_relu_gaussian_moments():
    # the mean and variance of ReLU(N(0, 1)) by quadrature of the Gaussian density
    t = torch.linspace(0, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    mean = torch.trapezoid(t * density, t).item()
    variance = torch.trapezoid(t * t * density, t).item() - mean ** 2
    assert RELU_GAUSSIAN_MEAN == pytest.approx(mean, rel=1e-9)
    assert RELU_GAUSSIAN_STD == pytest.approx(math.sqrt(variance), rel=1e-9)
    # and the standardized ReLU output of a Gaussian is standardized
    torch.manual_seed(0)
    h = torch.relu(torch.randn(1_000_000, dtype=torch.float64))
    h_std = (h - RELU_GAUSSIAN_MEAN) / RELU_GAUSSIAN_STD
    assert abs(h_std.mean().item()) < 5e-3 and h_std.var().item() == pytest.approx(1, abs=5e-3)


def test_normprop_without_input_activation_is_weight_norm():
    torch.manual_seed(0)
    normprop = randomize(NormPropLinear(6, 4, input_activation=None))
    weight_norm = WeightNormLinear(6, 4)
    weight_norm.load_state_dict(normprop.state_dict())
    x = torch.randn(3, 6)
    assert torch.equal(normprop(x), weight_norm(x))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"nonlinearity must be one of \['linear', 'relu'\]"):
        ScaledWeightNormLinear(4, 4, nonlinearity="tanh")
    with pytest.raises(ValueError, match="nonlinearity"):
        ScaledWeightNormConv2d(4, 4, 3, nonlinearity="ReLU")
    with pytest.raises(ValueError, match=r"input_activation must be one of \['relu', None\]"):
        NormPropLinear(4, 4, input_activation="sigmoid")
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        WeightNormLinear(0, 4)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        NormPropConv2d(3, -1, 3)
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 4\), got \(2, 5\)"):
        WeightNormLinear(4, 3)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) or \(3, H, W\), got \(2, 4, 5, 5\)"):
        WeightNormConv2d(3, 2, 3)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="got \\(3, 5\\)"):
        WeightNormConv2d(3, 2, 3)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"WeightNormConv1d: expected input of shape "
                                         r"\(N, 3, L\) or \(3, L\), got \(2, 3, 5, 5\)"):
        WeightNormConv1d(3, 2, 3)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"NormPropConv3d: expected input of shape \(N, 3, "
                                         r"D, H, W\) or \(3, D, H, W\), got \(2, 3, 5, 5\)"):
        NormPropConv3d(3, 2, 3)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        ScaledWeightNormConv3d(0, 2, 3)
    with pytest.raises(TypeError, match="expected a floating-point input, got torch.int64"):
        WeightNormLinear(4, 3)(torch.ones(2, 4, dtype=torch.long))


def example_input(cls, batch, features):
    """A float32 input for a layer of class `cls` with `features` inputs."""
    if cls in LINEARS:
        return torch.randn(batch, features)
    return torch.randn(batch, features, *(5,) * cls.spatial_dims())


@pytest.mark.parametrize("cls", LINEARS + ALL_CONVS)
def test_zero_weight_row_gives_finite_outputs_and_gradients(cls):
    layer = randomize(cls(4, 3) if cls in LINEARS else cls(4, 3, 1))
    with torch.no_grad():
        layer.weight[0].zero_()
    x = example_input(cls, 2, 4)
    z = layer(x)
    z.sum().backward()
    assert torch.isfinite(z).all() and torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(layer.gain.grad).all()


@pytest.mark.parametrize("cls", LINEARS + ALL_CONVS)
def test_module_conventions(cls):
    layer = cls(4, 6) if cls in LINEARS else cls(4, 6, 3, padding=1)
    assert torch.equal(layer.gain, torch.ones(6)) and torch.equal(layer.bias, torch.zeros(6))
    randomize(layer)
    assert "in" in repr(layer) and ("nonlinearity" in repr(layer)) == ("Scaled" in cls.__name__)
    assert ("input_activation" in repr(layer)) == ("NormProp" in cls.__name__)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    clone = cls(4, 6) if cls in LINEARS else cls(4, 6, 3, padding=1)
    clone.load_state_dict(torch.load(buffer))
    x = example_input(cls, 3, 4)
    assert torch.equal(clone(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), clone(x)), "eval mode computes what training mode does"
    assert torch.allclose(layer(x[:1]), layer(x)[:1], atol=1e-6), "no batch statistics"
    layer.reset_parameters()
    assert torch.equal(layer.gain, torch.ones(6)) and torch.equal(layer.bias, torch.zeros(6))


@pytest.mark.parametrize("cls", LINEARS + ALL_CONVS)
def test_dtypes_and_bfloat16_autocast(cls):
    layer = randomize(cls(8, 6) if cls in LINEARS else cls(8, 6, 3, padding=1))
    x = example_input(cls, 4, 8)
    expected = layer(x)
    assert torch.allclose(layer.double()(x.double()).float(), expected, atol=1e-5)
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
    assert torch.isfinite(z).all()
    assert torch.allclose(z.float(), expected, atol=0.05 * expected.abs().max().item())


def test_registry_entries():
    for name, linear in (("weight_norm", WeightNormLinear),
                         ("scaled_weight_norm", ScaledWeightNormLinear),
                         ("normprop", NormPropLinear)):
        method = normlab.registry.get(name)
        assert method.family == "weight"
        assert method.replaces == {nn.Linear: linear, **{
            TORCH_CONV[dims]: conv_of(linear, dims) for dims in (1, 2, 3)}}
    assert normlab.registry.get("normprop").first_layer_kw == {"input_activation": None}
    assert normlab.WeightNormLinear is WeightNormLinear
    for cls in ALL_CONVS:
        assert getattr(normlab, cls.__name__) is cls


@pytest.mark.parametrize("name", ["weight_norm", "scaled_weight_norm", "normprop"])
@pytest.mark.parametrize("build,shape", [
    (lambda: models.mlp(hidden=32), (3, 1, 28, 28)),
    (lambda: models.fc_cifar(p=1, width=16), (3, 3, 32, 32)),
    (lambda: models.cifar_resnet(depth=8, width=4, norm="none"), (3, 3, 32, 32)),
])
def test_convert_keeps_each_models_function(name, build, shape):
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    converted = normlab.convert(model, name)
    assert torch.allclose(converted(x), model(x), rtol=1e-10, atol=1e-10)
    method = normlab.registry.get(name)
    weighted = [m for m in converted.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert all(type(m) in method.replaces.values() for m in weighted)
    if name == "normprop":
        assert [m.input_activation for m in weighted] == [None] + ["relu"] * (len(weighted) - 1)


def small_cnn(dims):
    """Conv, ReLU, strided conv, ReLU, linear head, in `dims` spatial dims (float64)."""
    conv = TORCH_CONV[dims]
    return nn.Sequential(conv(2, 6, 3, padding=1), nn.ReLU(), conv(6, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 ** dims, 3)).double()


@pytest.mark.parametrize("name", ["weight_norm", "scaled_weight_norm", "normprop"])
@pytest.mark.parametrize("dims", [1, 3])
def test_convert_swaps_conv1d_and_conv3d_keeping_the_function(name, dims):
    torch.manual_seed(0)
    model = small_cnn(dims)
    x = torch.randn(3, 2, *(5,) * dims, dtype=torch.float64)
    converted = normlab.convert(model, name)
    assert torch.allclose(converted(x), model(x), rtol=1e-10, atol=1e-10)
    method = normlab.registry.get(name)
    assert [type(converted[i]) for i in (0, 2, 5)] == [
        method.replaces[type(model[i])] for i in (0, 2, 5)]
    assert isinstance(converted[0], conv_of(method.replaces[nn.Linear], dims))
    assert torch.allclose(normlab.fold(converted)(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims", [1, 3])
def test_normprop_convert_standardizes_every_conv_but_the_first_in_1d_and_3d(dims):
    converted = normlab.convert(small_cnn(dims), "normprop")
    assert [converted[i].input_activation for i in (0, 2, 5)] == [None, "relu", "relu"]


def resnet_signal_gain(depth, scale_residual, x):
    """||features(x)|| / ||x|| of a scaled-WN cifar_resnet at the lecture's initialization."""
    model = models.cifar_resnet(depth=depth, width=8, norm="scaled_weight_norm",
                                scale_residual=scale_residual)
    for layer in model.modules():
        if isinstance(layer, ScaledWeightNormConv2d):
            layer.reset_parameters()  # gain 1, bias 0: convert kept torch's function instead
    features = model[:-3]  # up to the global pooling
    return (features(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean().item()


def test_residual_rule_keeps_the_signal_norm_independent_of_depth():
    """The lecture's rule for residual networks (divide each block by their number):
    from 1 to 9 blocks per stage the signal norm changes by less than a factor e;
    without the rule it explodes."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        shallow, deep = resnet_signal_gain(8, True, x), resnet_signal_gain(56, True, x)
        unscaled_deep = resnet_signal_gain(56, False, x)
    print(f"\nresnet ||features||/||x||: depth 8 {shallow:.3f}, depth 56 {deep:.3f}, "
          f"depth 56 without the rule {unscaled_deep:.3g}")
    assert 1 / math.e < deep / shallow < math.e
    assert unscaled_deep > 100 * deep


@pytest.mark.parametrize("name", ["weight_norm", "scaled_weight_norm", "normprop"])
def test_converted_mlp_trains_on_mnist(name, data_root):
    config = TrainConfig(task="mnist-mlp", norm=name, lr=0.05, batch_size=64, eval_every=8,
                         train_limit=2000, test_limit=1000, model_kw={"hidden": 128})
    result = train(config, data_dir=data_root)
    losses = [point["train_loss"] for point in result.history]
    assert result.status == "done" and losses[-1] < 0.6 * losses[0]
    assert result.final["test_acc"] > 0.6  # chance is 0.1


@pytest.mark.parametrize("cls", LINEARS)
def test_linear_saves_at_most_torch_linears_tensors_plus_its_output_and_norms(cls):
    """Beyond what nn.Linear saves (the input; the weight is a parameter): the (N, out)
    output before the scale, and two floats per unit (norm and scale), in float32 and under
    bfloat16 autocast, where nothing else may be kept (no cast copy of the weight)."""
    from normlab.experiments.memory import saved_bytes

    x = torch.randn(3, 40, requires_grad=True)
    layer, plain = cls(40, 30), nn.Linear(40, 30)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours, torchs = saved_bytes(layer, x), saved_bytes(plain, x)
        beyond = 3 * 30 * x.element_size() + 2 * 30 * x.element_size()
        assert ours <= torchs + beyond, (autocast, ours, torchs)


# -- torch weight-norm checkpoints (issue 26 item 7) ---------------------------------------

def torch_weight_normalized(torch_layer, api, dim, seed=0):
    """`torch_layer` weight-normalized by torch's `api` ("parametrization":
    torch.nn.utils.parametrizations.weight_norm; "hook": the old torch.nn.utils.weight_norm)
    along `dim`, with lengths g set away from the norms of v, so that g matters."""
    if api == "parametrization":
        layer = torch.nn.utils.parametrizations.weight_norm(torch_layer, dim=dim)
        lengths = layer.parametrizations.weight.original0
    else:
        with pytest.warns(FutureWarning, match="deprecated"):
            layer = torch.nn.utils.weight_norm(torch_layer, dim=dim)
        lengths = layer.weight_g
    with torch.no_grad():
        lengths.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(seed))
    return layer


def direction_and_lengths(layer, api):
    if api == "parametrization":
        return (layer.parametrizations.weight.original1,
                layer.parametrizations.weight.original0)
    return layer.weight_v, layer.weight_g


TORCH_LAYERS = {0: lambda: nn.Linear(7, 5), 1: lambda: nn.Conv1d(3, 4, 3, padding=1),
                2: lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
                3: lambda: nn.Conv3d(3, 4, 2, padding=1)}


def example_for(dims, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (4, 7) if dims == 0 else (2, 3, *POSITIONS[dims])
    return torch.randn(shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("api", ["parametrization", "hook"])
@pytest.mark.parametrize("dims", [0, 1, 2, 3])  # 0: Linear
@pytest.mark.parametrize("dim", [0, 1, -1, None])  # -1: torch's last dim, or the whole tensor
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_module_of_a_torch_weight_normalized_layer_keeps_its_function(api, dims, dim,
                                                                          dtype):
    torch.manual_seed(0)
    source = torch_weight_normalized(TORCH_LAYERS[dims]().to(dtype), api, dim)
    cls = WeightNormLinear if dims == 0 else conv_of(WeightNormLinear, dims)
    layer = cls.from_module(source)
    x = example_for(dims, dtype)
    with torch.no_grad():
        expected = source(x)
        tolerance = (1e-12 if dtype == torch.float64 else 1e-6) * expected.abs().max().item()
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=tolerance)
        plain = layer.to_plain()
        assert type(plain) is cls.plain_type  # not torch's parametrized class
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=tolerance)
    direction, lengths = direction_and_lengths(source, api)
    if lengths.shape == (len(direction),) + (1,) * (direction.dim() - 1):  # one g per unit
        assert torch.equal(layer.weight, direction) and torch.equal(layer.gain, lengths.flatten())
    assert layer.weight.dtype == dtype and layer.gain.requires_grad


def test_from_the_old_hook_reads_g_and_v_not_the_weight_its_last_forward_left():
    """The old hook refreshes `module.weight` only in a forward: after g changes (a loaded
    checkpoint, an optimizer step) the attribute is stale; from_module computes the weight."""
    source = torch_weight_normalized(nn.Linear(6, 4).double(), "hook", 0)
    x = torch.randn(3, 6, dtype=torch.float64)
    source(x)
    with torch.no_grad():
        source.weight_g.mul_(3.0)  # module.weight is now stale
        layer = WeightNormLinear.from_module(source)
        expected = source(x)  # the hook recomputes
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls,kw", METHOD_KW)
@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_scaled_and_normprop_from_a_torch_weight_normalized_conv3d(cls, kw, api):
    source = torch_weight_normalized(nn.Conv3d(3, 4, 2, padding=1).double(), api, 0)
    x = torch.relu(example_for(3, torch.float64))
    layer = conv_of(cls, 3).from_module(source, **kw)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), source(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.to_plain()(x), source(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("api", ["parametrization", "hook"])
def test_the_other_weight_methods_read_a_torch_weight_normalized_layers_weight(api):
    """FastNorm keeps the function; EquiNorm and Weight Standardization (which cannot) are
    what they are from a plain layer with the same weight."""
    torch.manual_seed(0)
    source = torch_weight_normalized(nn.Conv2d(3, 4, 3, padding=1).double(), api, 0)
    plain = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        plain.weight.copy_(torch._weight_norm(*direction_and_lengths(source, api), 0))
        plain.bias.copy_(source.bias)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    fast = normlab.FastNormConv2d.from_module(source)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), source(x), rtol=1e-12, atol=1e-12)
    for cls in (normlab.EquiNormConv2d,
                normlab.layers.weight_standardization.WeightStandardizedConv2d):
        from_source, from_plain = cls.from_module(source).eval(), cls.from_module(plain).eval()
        with torch.no_grad():
            torch.testing.assert_close(from_source(x), from_plain(x), rtol=1e-12, atol=1e-12)
    linear = torch_weight_normalized(nn.Linear(5, 3).double(), api, None)
    fast = normlab.FastNormLinear.from_module(linear, input_activation="relu")
    h = torch.rand(4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(h), linear(h), rtol=1e-12, atol=1e-12)


def test_convert_swaps_torch_parametrized_layers():
    # (a model with the old hook cannot be deep-copied: torch refuses, naming weight_norm)
    torch.manual_seed(0)
    model = nn.Sequential(
        torch_weight_normalized(nn.Conv1d(2, 4, 3, padding=1).double(), "parametrization", 0),
        nn.ReLU(), nn.Flatten(),
        torch_weight_normalized(nn.Linear(20, 3).double(), "parametrization", None))
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    for name in ("weight_norm", "fastnorm"):
        converted = normlab.convert(model, name)
        assert type(converted[0]) is normlab.registry.get(name).replaces[nn.Conv1d]
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_torch_weight_normalized_layer_of_another_type_is_refused_by_name():
    source = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="WeightNormLinear.from_module expects an nn.Linear, "
                                        "got ParametrizedConv2d"):
        WeightNormLinear.from_module(source)
    with pytest.raises(TypeError, match="expects an nn.Conv1d, got ParametrizedConv2d"):
        WeightNormConv1d.from_module(source)

"""Weight normalization and two relatives, as drop-in nn.Linear / nn.Conv1d / nn.Conv2d /
nn.Conv3d.

All three compute, for the output unit i with weight row (or kernel) w_i,

    z_i = factor * gain_i * (w_i . x~) / ||w_i|| + bias_i

and differ only in `factor` and in the input standardization x~:

* WeightNorm (Salimans and Kingma 2016): factor = 1, x~ = x.
* Scaled WeightNorm (Arpit and Bengio 2019; lecture, section 5):
  factor = sqrt(2 fan_in / fan_out) before a ReLU, sqrt(fan_in / fan_out)
  before nothing; with gain 1 a deep ReLU network keeps the norm of its
  signal and of its gradients at initialization.
* NormProp (Arpit et al. 2016): factor = 1 and, when the input is a ReLU
  output, x~ = (x - mu) / sigma with mu = sqrt(1 / (2 pi)) and
  sigma = sqrt((1 - 1/pi) / 2), the mean and std of ReLU(N(0, 1)).

Autograd differentiates through ||w_i||: the true weight-normalization
gradient, orthogonal to w_i. Each class subclasses the torch layer it
replaces, so it takes the same constructor arguments and keeps torch's
`weight` (now the direction), `bias` and geometry; `gain` is the length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import checks, functional
from ._base import SPATIAL_NAMES, ConvGeometry, SourceWeight, WeightNormalizedLayer

RELU_GAUSSIAN_MEAN = math.sqrt(1 / (2 * math.pi))
RELU_GAUSSIAN_STD = math.sqrt((1 - 1 / math.pi) / 2)
NORM_EPS = 1e-12  # floor of ||w_i||: a zero row gives a zero output, not NaN
_NONLINEARITY_GAIN = {"relu": 2.0, "linear": 1.0}
# input_activation -> the (mean, std) a NormProp layer standardizes its input with
INPUT_STATS = {"relu": (RELU_GAUSSIAN_MEAN, RELU_GAUSSIAN_STD), None: None}


class WeightNormBase(WeightNormalizedLayer):
    """What WeightNorm, scaled WeightNorm and NormProp layers share, mixed in before
    nn.Linear / nn.ConvNd: each divides its rows by their norms in every forward.

    A geometry class provides `_map(x)`, `_check_input`,
    `fan_in`/`fan_out` and `_unit_dim`; a method mixin
    overrides `_factor` and `_input_stats`.
    """

    def _add_gain(self) -> None:
        self.gain = nn.Parameter(torch.ones(self.weight.shape[0], device=self.weight.device,
                                            dtype=self.weight.dtype))

    def reset_parameters(self) -> None:
        """The direction as torch initializes the layer; gain 1 and bias 0."""
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if "gain" in self._parameters:  # torch's __init__ calls this before gain exists
            nn.init.ones_(self.gain)

    def _factor(self) -> float:
        return 1.0

    def _input_stats(self) -> tuple[float, float] | None:
        return None

    def _gain_and_input_mean(self):
        """(gain', m) such that z = gain' * (w . (x - m)) / ||w|| + bias."""
        factor, stats = self._factor(), self._input_stats()
        gain = self.gain if factor == 1.0 else self.gain * factor
        if stats is None:
            return gain, 0.0
        mean, std = stats
        return gain / std, mean

    def _scale_and_bias(self):
        """(gain', inv_norm, bias') such that z = gain' * inv_norm * (w . x) + bias'."""
        weight = self.weight.flatten(1)
        inv_norm = functional.row_norms(self.weight, NORM_EPS).reciprocal()
        gain, mean = self._gain_and_input_mean()
        bias = self.bias
        if mean:
            # w . (x - mean) = w . x - mean * sum(w): folded into the bias, so no
            # pass over x. A convolution's zero padding counts as a ReLU output of
            # 0, standardized like the rest; from_module stays exact with padding.
            shift = -mean * gain * inv_norm * weight.sum(1)
            bias = shift if bias is None else bias + shift
        return gain, inv_norm, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.floating_point_input(type(self).__name__, x)
        self._check_input(x)
        return self._map(x)

    @torch.no_grad()
    def to_plain(self, input_size=None) -> nn.Module:
        """The torch layer computing this layer's function: kernel gain' w / ||w||, bias b'.

        (gain', b') as in the forward, so NormProp's input standardization is
        in the bias, which the plain layer gets even where this one has none.
        Same geometry, padding mode, device and dtype; for inference (fold).
        """
        gain, inv_norm, bias = self._scale_and_bias()
        per_unit = (-1,) + (1,) * (self.weight.dim() - 1)
        return self._plain_with(self.weight * (gain * inv_norm).view(per_unit), bias)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> torch.Tensor:
        """Salimans and Kingma's data-dependent initialization on the batch `x`.

        Rescales gain and sets bias so that the outputs on `x` have zero mean
        and unit variance per unit (over the batch, and the positions of a
        convolution); a unit whose output is constant on `x` keeps its gain.
        Returns the new outputs (the next layer's input for a layer-by-layer
        initialization).
        """
        if self.bias is None:
            raise ValueError(f"{type(self).__name__}.data_init needs a bias (bias=True) to "
                             f"center the outputs")
        z = self(x)
        units = z.movedim(self._unit_dim, -1).reshape(-1, z.shape[self._unit_dim])
        mean, std = units.mean(0), units.std(0, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.gain.div_(std)
        self.bias.sub_(mean).div_(std)
        return self(x)

    def _load_source(self, source: SourceWeight) -> None:
        """The torch layer's function: the direction is torch's v where torch
        weight-normalizes the layer with dim=0, else its weight; the gain is the direction's
        length (torch's g, or the row norm) with the constant factor and the input
        standardization undone; the bias undoes the standardization's shift. A NormProp
        layer that standardizes its input gets a bias even if the source has none."""
        if self.bias is None and self._input_stats() is not None:
            self.bias = nn.Parameter(torch.zeros_like(self.gain))
        direction = source.weight if source.direction is None else source.direction
        lengths = source.lengths
        if lengths is None:
            lengths = functional.row_norms(direction, NORM_EPS)
        self.weight.copy_(direction)
        self.gain.fill_(1)
        unit_gain, _ = self._gain_and_input_mean()  # the factor and 1 / std at gain 1
        self.gain.copy_(lengths / unit_gain)
        if self.bias is not None:
            self.bias.zero_()
            _, _, shift = self._scale_and_bias()
            self.bias.copy_(-shift if source.bias is None else source.bias - shift)


class _Scaled:
    """Scaled WeightNorm's constant factor; mixed in before a WeightNorm class."""

    def __init__(self, *args, nonlinearity: str = "relu", **kw):
        checks.one_of(type(self).__name__, "nonlinearity", nonlinearity,
                      sorted(_NONLINEARITY_GAIN), " (the activation after the layer)")
        super().__init__(*args, **kw)
        self.nonlinearity = nonlinearity

    def _factor(self) -> float:
        return math.sqrt(_NONLINEARITY_GAIN[self.nonlinearity] * self.fan_in / self.fan_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity!r}"


class _NormProp:
    """NormProp's input standardization; mixed in before a WeightNorm class."""

    first_layer_kw = {"input_activation": None}  # a model's input is no ReLU output

    def __init__(self, *args, input_activation: str | None = "relu", **kw):
        checks.one_of(type(self).__name__, "input_activation", input_activation, INPUT_STATS,
                      " ('relu': the input is a ReLU output; None: standardized data)")
        super().__init__(*args, **kw)
        self.input_activation = input_activation

    def _input_stats(self) -> tuple[float, float] | None:
        return INPUT_STATS[self.input_activation]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input_activation={self.input_activation!r}"


class WeightNormLinear(WeightNormBase, nn.Linear):
    r"""A linear layer with weight normalization (Salimans and Kingma 2016).

    .. math:: z_i = \gamma_i \frac{w_i \cdot x}{\|w_i\|} + b_i

    `weight` (w) holds the directions, `gain` (gamma, shape (out,)) their
    lengths, `bias` (b) the shift; gradients flow through the norm, so the
    gradient of each w_i is orthogonal to it. Initialization: torch's for w,
    gamma = 1, b = 0; `data_init(x)` is the paper's data-dependent one.

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.

    Shape:
        - Input: (*, in_features)
        - Output: (*, out_features)

    Example:
        >>> layer = WeightNormLinear(784, 1024)
        >>> z = layer.data_init(torch.randn(256, 784))  # zero mean, unit variance per unit
        >>> head = WeightNormLinear.from_module(nn.Linear(1024, 10))  # the same function
    """

    plain_type = nn.Linear

    _unit_dim = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        checks.positive_int(type(self).__name__, "in_features", in_features)
        checks.positive_int(type(self).__name__, "out_features", out_features)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._add_gain()

    @property
    def fan_in(self) -> int:
        return self.in_features

    @property
    def fan_out(self) -> int:
        return self.out_features

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: expected input of shape "
                             f"(*, {self.in_features}), got {tuple(x.shape)}")

    def _map(self, x):
        gain, input_mean = self._gain_and_input_mean()
        return functional.weight_norm_linear(x, self.weight, gain, self.bias, input_mean,
                                             NORM_EPS)


class _WeightNormConv(ConvGeometry, WeightNormBase):
    r"""A convolution with weight normalization (Salimans and Kingma 2016).

    .. math:: z_c = \gamma_c \frac{w_c \star x}{\|w_c\|} + b_c

    with w_c the kernel of output channel c, of shape
    (in_channels / groups, *kernel_size), normalized as a whole. Initialization
    as in the torch convolution, then gamma = 1, b = 0.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        bias, padding_mode, device, dtype: as the torch convolution it replaces.

    Shape:
        - Input: (N, C_in, *positions) or (C_in, *positions)
        - Output: (N, C_out, *positions_out) or (C_out, *positions_out), as torch's

    Example:
        >>> layer = WeightNormConv2d(3, 16, 3, padding=1)
        >>> layer(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 16, 32, 32])
    """

    @property
    def _unit_dim(self) -> int:  # the output's channel dim, from the end: unbatched inputs too
        return -self.spatial_dims() - 1

    def __init__(self, in_channels: int, out_channels: int, *args, **kw):
        checks.positive_int(type(self).__name__, "in_channels", in_channels)
        checks.positive_int(type(self).__name__, "out_channels", out_channels)
        super().__init__(in_channels, out_channels, *args, **kw)
        self._add_gain()

    @property
    def fan_in(self) -> int:
        return self.in_channels * math.prod(self.kernel_size)

    @property
    def fan_out(self) -> int:
        return self.out_channels * math.prod(self.kernel_size)

    def _check_input(self, x: torch.Tensor) -> None:
        self._check_conv_input(x, unbatched_too=True)

    def _map(self, x):
        gain, inv_norm, bias = self._scale_and_bias()
        x, padding = self._padded(x)
        return functional.row_scaled_conv(x, self.weight, gain, inv_norm, bias, self.stride,
                                          padding, self.dilation, self.groups)


class WeightNormConv1d(_WeightNormConv, nn.Conv1d):
    __doc__ = _WeightNormConv.__doc__.replace("A convolution", "A 1d convolution", 1)
    plain_type = nn.Conv1d


class WeightNormConv2d(_WeightNormConv, nn.Conv2d):
    __doc__ = _WeightNormConv.__doc__.replace("A convolution", "A 2d convolution", 1)
    plain_type = nn.Conv2d


class WeightNormConv3d(_WeightNormConv, nn.Conv3d):
    __doc__ = _WeightNormConv.__doc__.replace("A convolution", "A 3d convolution", 1)
    plain_type = nn.Conv3d


class ScaledWeightNormLinear(_Scaled, WeightNormLinear):
    r"""A linear layer with scaled weight normalization (Arpit and Bengio 2019).

    .. math:: z_i = \sqrt{k \cdot \mathrm{fan\_in} / \mathrm{fan\_out}}
              \cdot \gamma_i \frac{w_i \cdot x}{\|w_i\|} + b_i

    with k = 2 for a layer followed by a ReLU (``nonlinearity="relu"``, the
    default) and k = 1 for a linear one (``nonlinearity="linear"``);
    gamma = 1 and b = 0 at initialization, where the factor keeps
    E||ReLU(z)||^2 = ||x||^2.

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        nonlinearity: ``"relu"`` (k = 2) or ``"linear"`` (k = 1), the
            activation after the layer. Keyword only. Default: ``"relu"``.

    Shape:
        - Input: (*, in_features)
        - Output: (*, out_features)

    Example:
        >>> layers = [ScaledWeightNormLinear(1000, 1000) for _ in range(20)]
        >>> head = ScaledWeightNormLinear(1000, 10, nonlinearity="linear")
    """


_SCALED_CONV_DOC = r"""A {n}d convolution with scaled weight normalization (Arpit and Bengio 2019).

    .. math:: z_c = \sqrt{{k \cdot \mathrm{{fan\_in}} / \mathrm{{fan\_out}}}}
              \cdot \gamma_c \frac{{w_c \star x}}{{\|w_c\|}} + b_c

    k as in `ScaledWeightNormLinear`; fan_in = in_channels * kernel size and
    fan_out = out_channels * kernel size (the kernel size: the product of kernel_size).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        bias, padding_mode, device, dtype: as :class:`torch.nn.Conv{n}d`.
        nonlinearity: as :class:`ScaledWeightNormLinear`.

    Shape:
        - Input: (N, C_in, {positions}) or (C_in, {positions}), as nn.Conv{n}d
        - Output: (N, C_out, *positions_out) or (C_out, *positions_out)

    Example:
        >>> conv = ScaledWeightNormConv{n}d(16, 32, 3, padding=1, nonlinearity="relu")
    """


class ScaledWeightNormConv1d(_Scaled, WeightNormConv1d):
    __doc__ = _SCALED_CONV_DOC.format(n=1, positions=SPATIAL_NAMES[1])


class ScaledWeightNormConv2d(_Scaled, WeightNormConv2d):
    __doc__ = _SCALED_CONV_DOC.format(n=2, positions=SPATIAL_NAMES[2])


class ScaledWeightNormConv3d(_Scaled, WeightNormConv3d):
    __doc__ = _SCALED_CONV_DOC.format(n=3, positions=SPATIAL_NAMES[3])


class NormPropLinear(_NormProp, WeightNormLinear):
    r"""A linear layer of Normalization Propagation (Arpit et al. 2016).

    .. math:: z_i = \gamma_i \frac{w_i \cdot \tilde x}{\|w_i\|} + b_i, \quad
              \tilde x = (x - \sqrt{1/(2\pi)}) / \sqrt{(1 - 1/\pi)/2}

    for ``input_activation="relu"`` (the default: x is a ReLU output, whose
    mean and std for a unit Gaussian pre-activation are those constants), and
    x~ = x for ``input_activation=None`` (the first layer, on standardized
    data). No batch statistics: training and evaluation compute the same.

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        input_activation: ``"relu"`` or None, what the input is (above).
            Keyword only. Default: ``"relu"``.

    Shape:
        - Input: (*, in_features)
        - Output: (*, out_features)

    Example:
        >>> first = NormPropLinear(784, 1024, input_activation=None)
        >>> second = NormPropLinear(1024, 10)
        >>> second(torch.relu(first(torch.randn(8, 784)))).shape
        torch.Size([8, 10])
    """


_NORMPROP_CONV_DOC = r"""A {n}d convolution of Normalization Propagation (Arpit et al. 2016).

    .. math:: z_c = \gamma_c \frac{{w_c \star \tilde x}}{{\|w_c\|}} + b_c

    x~ as in `NormPropLinear`; zero padding counts as a ReLU output of 0 and
    is standardized too.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        bias, padding_mode, device, dtype: as :class:`torch.nn.Conv{n}d`.
        input_activation: as :class:`NormPropLinear`.

    Shape:
        - Input: (N, C_in, {positions}) or (C_in, {positions}), as nn.Conv{n}d
        - Output: (N, C_out, *positions_out) or (C_out, *positions_out)

    Example:
        >>> conv = NormPropConv{n}d(16, 32, 3, padding=1)  # after a ReLU
    """


class NormPropConv1d(_NormProp, WeightNormConv1d):
    __doc__ = _NORMPROP_CONV_DOC.format(n=1, positions=SPATIAL_NAMES[1])


class NormPropConv2d(_NormProp, WeightNormConv2d):
    __doc__ = _NORMPROP_CONV_DOC.format(n=2, positions=SPATIAL_NAMES[2])


class NormPropConv3d(_NormProp, WeightNormConv3d):
    __doc__ = _NORMPROP_CONV_DOC.format(n=3, positions=SPATIAL_NAMES[3])

"""Weight Standardization (Qiao et al. 2019) as drop-in nn.Conv1d / nn.Conv2d / nn.Conv3d."""

from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..functional.weight_standardization import standardized_weight
from ._base import SourceWeight, WeightNormalizedLayer

# The floor of each kernel's std (normlab's weight norm floors ||w|| at the same value).
STD_EPS = 1e-12


class _WeightStandardized(WeightNormalizedLayer):
    r"""A convolution whose kernels are standardized before use (Qiao et al. 2019,
    arXiv:1903.10520): for output channel i, with mu_i and sigma_i the mean and standard
    deviation of its kernel W_i over its fan-in (in_channels / groups times the kernel
    size),

    .. math:: \hat W_i = (W_i - \mu_i) / \max(\sigma_i, \epsilon), \quad
              z = \hat W \star x + b

    (the paper guards the division with sqrt(sigma^2 + eps); the floor, at 1e-12 by
    default, keeps each kernel's scale out of the output wherever sigma exceeds it).
    `weight` holds the raw kernels and the gradient flows through the standardization.
    It has no gain: the paper pairs it with a Group Normalization after each
    convolution, which sets the scale (``normlab.convert(model, "group")`` then
    ``normlab.convert(..., "weight_standardization", keep_activation_norm=True)``).
    A kernel of one weight (fan-in 1) standardizes to zero.

    ``from_module`` keeps the module's kernels as the raw `weight` and its bias, so the
    layer computes the convolution with those kernels standardized: NOT the module's
    function (``from_module_keeps_function`` is False), since a standardized kernel has
    mean 0 and std 1 and no per-channel bias restores another mean. ``to_plain`` is exact:
    the torch convolution with the standardized kernels.

    Args:
        the arguments of the torch convolution it replaces, and
        eps: the floor of each kernel's standard deviation. Default: 1e-12.

    Example:
        >>> conv = WeightStandardizedConv2d(3, 16, 3, padding=1)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    from_module_keeps_function = False

    def __init__(self, *args, eps: float = STD_EPS, **kw):
        checks.in_interval(type(self).__name__, "eps", eps, "(0, inf)")
        super().__init__(*args, **kw)
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"

    def standardized_weight(self) -> torch.Tensor:
        """The kernels the convolution uses."""
        return standardized_weight(self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checks.floating_point_input(type(self).__name__, x)
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def _load_source(self, source: SourceWeight) -> None:
        """The torch layer's kernels (its weight as it computes it) as the raw `weight`, and
        its bias (class docstring: the function is that of the standardized kernels)."""
        self.weight.copy_(source.weight)
        if self.bias is not None:
            self.bias.copy_(source.bias)

    def to_plain(self, input_size=None) -> nn.Module:
        """The torch convolution with this layer's standardized kernels and bias."""
        return self._plain_with(self.standardized_weight(), self.bias)


class WeightStandardizedConv1d(_WeightStandardized, nn.Conv1d):
    __doc__ = f"nn.Conv1d with Weight Standardization.\n{_WeightStandardized.__doc__}"
    plain_type = nn.Conv1d


class WeightStandardizedConv2d(_WeightStandardized, nn.Conv2d):
    __doc__ = f"nn.Conv2d with Weight Standardization.\n{_WeightStandardized.__doc__}"
    plain_type = nn.Conv2d


class WeightStandardizedConv3d(_WeightStandardized, nn.Conv3d):
    __doc__ = f"nn.Conv3d with Weight Standardization.\n{_WeightStandardized.__doc__}"
    plain_type = nn.Conv3d

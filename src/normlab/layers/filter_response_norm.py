"""Filter Response Normalization with a Thresholded Linear Unit (Singh and Krishnan 2020)."""

from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..functional.filter_response_norm import filter_response_norm
from ._base import ActivationNorm, check_channels_input

# The paper's learned epsilon is eps + |eps_offset|, the offset starting here.
LEARNED_EPS_START = 1e-4


class _FilterResponseNorm(nn.Module, ActivationNorm):
    _input_dims: tuple[int, ...]
    statistics_over = "positions"
    absorbs_following = (nn.ReLU,)  # its TLU: max(y, tau) is a ReLU at tau = 0

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False, *,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        checks.positive_int(name, "num_features", num_features)
        checks.in_interval(name, "eps", eps, "(0, inf)")
        self.num_features, self.eps, self.learnable_eps = num_features, eps, learnable_eps
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.tau = nn.Parameter(torch.empty(num_features, **factory))
        if learnable_eps:
            self.eps_offset = nn.Parameter(torch.empty((), **factory))
        else:
            self.register_parameter("eps_offset", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight 1, bias 0, tau 0 (the TLU starts as a ReLU), the learned eps offset 1e-4."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.tau)
        if self.eps_offset is not None:
            nn.init.constant_(self.eps_offset, LEARNED_EPS_START)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channels_input(type(self).__name__, x, self._input_dims, self.num_features)
        eps = self.eps if self.eps_offset is None else self.eps + self.eps_offset.abs()
        return filter_response_norm(x, self.weight, self.bias, self.tau, eps)


class FilterResponseNorm1d(_FilterResponseNorm):
    r"""Filter Response Normalization and its Thresholded Linear Unit over (N, C) or (N, C, L)
    inputs (Singh and Krishnan 2020, arXiv:1911.09737).

    For each sample and channel, with nu^2 the mean of x^2 over the positions:

    .. math::
        y = \mathrm{weight} \cdot x / \sqrt{\nu^2 + \epsilon} + \mathrm{bias}, \quad
        z = \max(y, \tau)

    No statistic crosses the batch: the same in training and evaluation, at any batch
    size, with nothing to sync under DDP. It replaces both the normalizer and the ReLU
    after it (tau = 0 starts it as one). On (N, C) inputs nu^2 = x^2, so x / sqrt(x^2 + eps)
    is close to sign(x): the paper learns eps there (``learnable_eps=True``).

    Args:
        num_features: C.
        eps: added to nu^2. Default: 1e-6, the paper's.
        learnable_eps: learn eps as ``eps + |eps_offset|`` (the offset starts at 1e-4), as
            the paper does for 1x1 activation maps; the floor `eps` keeps it positive.
            Default: False.
        device, dtype: of the parameters.

    Shape:
        - Input: (N, C) or (N, C, L)
        - Output: same shape as the input

    Example:
        >>> frn = FilterResponseNorm1d(64, learnable_eps=True)
        >>> out = frn(torch.randn(1, 64))  # batch size 1 is fine
    """

    _input_dims = (2, 3)
    dim = 1


class FilterResponseNorm2d(_FilterResponseNorm):
    r"""Filter Response Normalization with TLU over (N, C, H, W) inputs (Singh and Krishnan
    2020): the math of :class:`FilterResponseNorm1d`, nu^2 over H and W.

    Args:
        num_features, eps, learnable_eps, device, dtype: as :class:`FilterResponseNorm1d`.

    Shape:
        - Input: (N, C, H, W)
        - Output: (N, C, H, W)

    Example:
        >>> frn = FilterResponseNorm2d(64)
        >>> out = frn(torch.randn(2, 64, 32, 32))
    """

    _input_dims = (4,)
    dim = 2


class FilterResponseNorm3d(_FilterResponseNorm):
    r"""Filter Response Normalization with TLU over (N, C, D, H, W) inputs (Singh and
    Krishnan 2020): the math of :class:`FilterResponseNorm1d`, nu^2 over D, H and W.

    Args:
        num_features, eps, learnable_eps, device, dtype: as :class:`FilterResponseNorm1d`.

    Shape:
        - Input: (N, C, D, H, W)
        - Output: (N, C, D, H, W)

    Example:
        >>> frn = FilterResponseNorm3d(16)
        >>> out = frn(torch.randn(2, 16, 4, 8, 8))
    """

    _input_dims = (5,)
    dim = 3

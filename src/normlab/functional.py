"""Stateless math shared by the modules (the module <-> functional split of torch.nn)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def weight_normalized_linear(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor,
                             inv_norm: torch.Tensor, bias: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """z_i = gain_i * inv_norm_i * (W_i . x) + bias_i, the weight-normalized linear map.

    `inv_norm` is 1 / ||W_i||: computed from `weight` (WeightNorm, where
    autograd through the norm gives the true weight-normalization gradient)
    or tracked without touching `weight` (FastNorm). The scale is applied to
    the (N, out) output rather than to the (out, in) weight: cheaper whenever
    N < in_features.
    """
    z = F.linear(x, weight) * (gain * inv_norm)
    return z if bias is None else z + bias


def weight_normalized_conv2d(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor,
                             inv_norm: torch.Tensor, bias: torch.Tensor | None = None,
                             stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """The convolution counterpart of `weight_normalized_linear`.

    z_c = gain_c * inv_norm_c * (W_c * x) + bias_c, where W_c is output
    channel c's kernel (in_channels / groups, kH, kW) and inv_norm_c is
    1 / ||W_c|| over the whole kernel. The scale is applied per output
    channel of the (N, out, H', W') result, the kernel is left untouched.
    """
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    z = z * (gain * inv_norm)[:, None, None]
    return z if bias is None else z + bias[:, None, None]

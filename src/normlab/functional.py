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

"""Layer normalization of (N, C) vectors and (N, C, L) sequences alike."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._base import ActivationNorm


class VectorLayerNorm(nn.LayerNorm, ActivationNorm):
    """nn.LayerNorm(C) for (N, C) vectors that also takes (N, C, L) sequences,
    normalizing each sample over (C, L) as the dim=2 layer norm does over
    (C, H, W); nn.LayerNorm would normalize over L (or refuse when L != C).

    Args:
        num_features: C (nn.LayerNorm's `normalized_shape`).
        eps, elementwise_affine, bias, device, dtype: as :class:`torch.nn.LayerNorm`.
    """

    dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            return super().forward(x)
        y = F.layer_norm(x, x.shape[1:], eps=self.eps)
        if self.weight is not None:
            y = y * self.weight[:, None]
        return y if self.bias is None else y + self.bias[:, None]

"""Stateless math shared by the modules (the module <-> functional split of torch.nn)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


class _RowNorms(torch.autograd.Function):
    # A hand-written backward because torch's vector_norm backward makes three
    # passes over the weight (divide, mask the zero norms, multiply) where one
    # suffices; the weight is the large tensor here (the `weight_norm` bench case).
    @staticmethod
    def forward(ctx, weight: torch.Tensor, eps: float) -> torch.Tensor:
        norms = weight.flatten(1).norm(dim=1)
        ctx.save_for_backward(weight, norms)
        ctx.eps = eps
        return norms.clamp_min(eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight, norms = ctx.saved_tensors
        # d max(||w||, eps) / dw = w / ||w|| above eps, 0 below (the clamp is flat)
        coefficient = torch.where(norms > ctx.eps, grad / norms, torch.zeros_like(grad))
        return weight * coefficient.view(-1, *[1] * (weight.dim() - 1)), None


def row_norms(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """max(||W_i||, eps) for each output unit i (the norm over all dims but the first).

    Differentiable (the true gradient, w_i / ||w_i||, and 0 where the floor
    `eps` applies, so a zero row gives finite values); one pass over `weight`
    forward and one backward. Not twice differentiable.
    """
    return _RowNorms.apply(weight, eps)


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

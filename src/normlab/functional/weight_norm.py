"""Weight normalization's math: row norms, and Linear/ConvNd maps with normalized rows
(WeightNorm, scaled WeightNorm, NormProp, FastNorm)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .aten_helpers import (
    column_sums,
)


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


def row_scaled_linear(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor,
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


class _WeightNormLinear(torch.autograd.Function):
    # One node for the whole layer, so that the weight gradient is made in one
    # (out, in) buffer: the matmul's gradient, then the norm's term added in
    # place. Through autograd the norm's term is a second (out, in) tensor that
    # is then summed with the first: two more passes over the largest tensor
    # than torch's fused weight_norm takes. The norm term's coefficient needs
    # sum_n g_ni (w_i . x~_n), which comes from the (N, out) pre-scale output.
    # Saved: x, weight, the norms and scales, and that (N, out) output: what autograd
    # saved, less the cast copy of the weight it kept under autocast.
    @staticmethod
    def forward(ctx, x, weight, gain, bias, input_mean: float, eps: float):
        norms = torch.linalg.vector_norm(weight, dim=1)
        scale = gain / norms.clamp_min(eps)
        direction = F.linear(x, weight)  # w_i . x, in autocast's dtype where it is on
        ctx.matmul_dtype = direction.dtype  # backward's matmuls keep it, as autograd's do
        if input_mean:  # w . (x - m) = w . x - m sum(w): no pass over x
            direction = direction - input_mean * weight.sum(1)
        z = direction * scale if bias is None else torch.addcmul(bias, direction, scale)
        ctx.save_for_backward(x, weight, norms, scale, direction)
        ctx.input_mean, ctx.eps = input_mean, eps
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, norms, scale, direction = ctx.saved_tensors
        grad = grad.reshape(-1, weight.shape[0])
        grad_direction = grad * scale
        matmul_dtype = ctx.matmul_dtype
        grad_x = grad_weight = grad_gain = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_direction.to(matmul_dtype) @ weight.to(matmul_dtype)).to(x.dtype)
            grad_x = grad_x.reshape(x.shape)
        direction_grad = column_sums(grad * direction.reshape(grad.shape))  # d loss / d scale
        if ctx.needs_input_grad[1]:
            inputs = x.reshape(-1, weight.shape[1]).to(matmul_dtype)
            grad_weight = (grad_direction.to(matmul_dtype).T @ inputs).to(weight.dtype)
            if ctx.input_mean:
                grad_weight.sub_((ctx.input_mean * column_sums(grad_direction)).unsqueeze(1))
            # d scale_i / d w_i = -scale_i w_i / ||w_i||^2 above eps, 0 below (flat clamp)
            coefficient = torch.where(norms > ctx.eps, -scale * direction_grad / norms.square(),
                                      torch.zeros_like(norms))
            grad_weight.addcmul_(weight, coefficient.unsqueeze(1))
        if ctx.needs_input_grad[2]:
            grad_gain = direction_grad / norms.clamp_min(ctx.eps)
        if ctx.needs_input_grad[3]:
            grad_bias = column_sums(grad)
        return grad_x, grad_weight, grad_gain, grad_bias, None, None


def weight_norm_linear(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor,
                       bias: torch.Tensor | None = None, input_mean: float = 0.0,
                       eps: float = 1e-12) -> torch.Tensor:
    """z_i = gain_i * (W_i . (x - m)) / max(||W_i||, eps) + bias_i, with the norms taken here.

    The same map as :func:`row_scaled_linear` given 1 / max(||W_i||, eps),
    differentiated through the norms (the true weight-normalization gradient,
    orthogonal to each W_i; 0 through a norm under the floor `eps`), in the
    passes over `weight` torch's fused ``torch._weight_norm`` takes or fewer:
    one norm pass and the matmul forward; the matmul's gradient and one in-place
    pass for the norm's term backward. The scalar input shift m (NormProp's
    ReLU mean) is folded into the output as -m sum_k W_ik, never applied to x.
    Not twice differentiable.
    """
    return _WeightNormLinear.apply(x, weight, gain, bias, float(input_mean), eps)


_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the weight's rank


def row_scaled_conv(x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor,
                    inv_norm: torch.Tensor, bias: torch.Tensor | None = None,
                    stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """The convolution counterpart of `row_scaled_linear`, in 1, 2 or 3 spatial dims (those
    of `weight`: (out, in / groups, *kernel)).

    z_c = gain_c * inv_norm_c * (W_c * x) + bias_c, where W_c is output
    channel c's kernel and inv_norm_c is 1 / ||W_c|| over the whole kernel.
    The scale is applied per output channel of the (N, out, *positions) result,
    the kernel is left untouched.
    """
    z = _CONVOLUTIONS[weight.dim()](x, weight, None, stride, padding, dilation, groups)
    per_channel = (-1,) + (1,) * (weight.dim() - 2)
    z = z * (gain * inv_norm).view(per_channel)
    return z if bias is None else z + bias.view(per_channel)

"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275): forward and backward."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .._ext import loader as _native
from ..distributed import global_batch_norm
from .aten_helpers import (
    autocast_off,
    batch_norm_backward,
    batch_statistics,
)


def _renorm_constants(batch_mean, batch_inv_std, running_mean, sigma, r_max: float,
                      d_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch Renormalization's r = clip(sigma_B / sigma) and d = clip((mu_B - mu) / sigma)."""
    r = (1 / (batch_inv_std * sigma)).clamp(1 / r_max, r_max)
    d = ((batch_mean - running_mean) / sigma).clamp(-d_max, d_max)
    return r, d


class _BatchRenorm(torch.autograd.Function):
    # Batch normalization with the weight weight * r and the bias weight * d + bias,
    # in BatchNorm's passes: with the batch statistics given (one pass, before),
    # the affine map forward; torch's batch-norm backward (a reduction and an
    # elementwise pass) backward. r and d are constants of the backward pass, so
    # the gradient w.r.t. x is batch normalization's with the weight weight * r.
    # Saved: x and per-channel vectors, as BatchNorm saves. With batch_statistics and
    # _renorm_constants, the specification of the compiled training step
    # (csrc/activations.cpp, batch_renorm_train), which runs instead on CPU.
    @staticmethod
    def forward(ctx, x, weight, bias, batch_mean, batch_var, batch_inv_std, r, d, eps: float):
        scale = weight * r
        ctx.save_for_backward(x, weight, batch_mean, batch_inv_std, r, d)
        return F.batch_norm(x, batch_mean, batch_var, scale, torch.addcmul(bias, weight, d),
                            False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, batch_mean, batch_inv_std, r, d = ctx.saved_tensors
        grad_x, grad_scale, grad_bias = batch_norm_backward(grad, x, weight * r, batch_mean,
                                                            batch_inv_std)
        # y = weight * (r x_hat + d) + bias
        grad_weight = torch.addcmul(r * grad_scale, d, grad_bias)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def batch_renorm(x: torch.Tensor, running_mean: torch.Tensor | None,
                 running_var: torch.Tensor | None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 training: bool = False, momentum: float = 0.01, eps: float = 1e-5,
                 r_max: float = 3.0, d_max: float = 5.0, process_group=None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    r"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275) of (N, C, *) `x`.

    In training, with mu_B, var_B the batch statistics of a channel,
    sigma_B = sqrt(var_B + eps) and sigma = sqrt(running_var + eps):

    .. math::
        r = \mathrm{clip}(\sigma_B / \sigma, 1 / r_{max}, r_{max}), \quad
        d = \mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max}) \\
        y = \mathrm{weight} \cdot ((x - \mu_B) / \sigma_B \cdot r + d) + \mathrm{bias}

    with r and d constants of the backward pass. Out of training it is
    batch normalization with the running statistics. Without running
    statistics (None) it is batch normalization with the batch's (r = 1,
    d = 0), in training only. Low-precision inputs
    are normalized in float32. With a `process_group` (torch.distributed),
    mu_B and var_B are those of the group's global batch.

    Returns:
        (y, new_running_mean, new_running_var): in training the statistics
        moved towards the batch ones by `momentum` (the variance unbiased, as
        in torch's BatchNorm), else the running statistics as given (None without). The
        inputs are not modified: under torch.compile an in-place update would
        let AOTAutograd's partitioner recompute r and d from the updated
        statistics in the backward (pytorch/pytorch#197039), a silently wrong
        weight gradient.
    """
    # Low-precision inputs are normalized in float32; the statistics stay float32.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    view = (1, -1) + (1,) * (x.dim() - 2)
    weight = work.new_ones(x.shape[1]) if weight is None else weight.to(work.dtype)
    bias = work.new_zeros(x.shape[1]) if bias is None else bias.to(work.dtype)
    if training and running_mean is not None and process_group is None:
        kernel = _native.for_tensor("activations", work, openmp=True)
        if kernel is not None and running_mean.dtype == running_var.dtype == work.dtype:
            # the step below, its statistics and _BatchRenorm in one compiled call each way
            # (csrc/activations.cpp): ~15 small torch operations around the passes cost
            # more than the passes themselves at batch 2 or on (N, C) inputs
            out, new_mean, new_var = kernel.batch_renorm_train(
                work, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max)
            return out.to(x.dtype), new_mean, new_var
    with autocast_off(x):
        if running_mean is None:
            if not training:
                raise ValueError("batch_renorm needs running statistics out of training")
            if process_group is not None:
                x_hat, _, _ = global_batch_norm(work, None, None, 0.0, eps, process_group)
                out = torch.addcmul(bias.view(view), x_hat, weight.view(view))
            else:
                out = F.batch_norm(work, None, None, weight, bias, True, 0.0, eps)
            return out.to(x.dtype), None, None
        if not training:
            out = F.batch_norm(work, running_mean, running_var, weight, bias, False, 0.0, eps)
            return out.to(x.dtype), running_mean, running_var
        sigma = (running_var + eps).sqrt()
        new_mean, new_var = running_mean.clone(), running_var.clone()
        if process_group is not None:
            x_hat, batch_mean, batch_inv_std = global_batch_norm(work, new_mean, new_var,
                                                                 momentum, eps, process_group)
            r, d = _renorm_constants(batch_mean, batch_inv_std, running_mean, sigma, r_max, d_max)
            out = torch.addcmul((d * weight + bias).view(view), x_hat, (r * weight).view(view))
        else:
            batch_mean, batch_var = batch_statistics(work, new_mean, new_var, momentum)
            batch_inv_std = (batch_var + eps).rsqrt()
            r, d = _renorm_constants(batch_mean, batch_inv_std, running_mean, sigma, r_max, d_max)
            out = _BatchRenorm.apply(work, weight, bias, batch_mean, batch_var, batch_inv_std,
                                     r, d, eps)
    return out.to(x.dtype), new_mean, new_var

"""The normalizers' math as functions of tensors: the module <-> functional split of torch.nn.

Each module in :mod:`normlab.layers` checks its arguments, owns its
parameters and buffers, and calls one function here, as torch.nn.BatchNorm2d
calls torch.nn.functional.batch_norm:

* :func:`weight_norm_linear`, :func:`weight_normalized_linear`,
  :func:`weight_normalized_conv2d` and :func:`row_norms`: weight normalization
  (WeightNorm, scaled WeightNorm, NormProp, FastNorm).
* :func:`batch_renorm`: Batch Renormalization.
* :func:`online_norm`: Online Normalization, forward and its control-process
  backward.
* :func:`equi_norm`: the effective kernel of Equilibrium Normalization.

Online Normalization updates the running statistics passed in place, as
torch.nn.functional.batch_norm does; batch_renorm returns the updated ones
(its docstring says why). Helpers built on torch's private kernels
live in :mod:`normlab.kernels`.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import _native
from ._native import tracing as _tracing
from .distributed import RankSlice, global_batch_norm
from .kernels import (
    batch_norm_backward,
    batch_statistics,
    clamp_backward,
    column_sums,
    row_sums,
    scale_shift,
)

ONLINE_NORM_ECMS = ("ls", "ac", None)


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

    The same map as :func:`weight_normalized_linear` given 1 / max(||W_i||, eps),
    differentiated through the norms (the true weight-normalization gradient,
    orthogonal to each W_i; 0 through a norm under the floor `eps`), in the
    passes over `weight` torch's fused ``torch._weight_norm`` takes or fewer:
    one norm pass and the matmul forward; the matmul's gradient and one in-place
    pass for the norm's term backward. The scalar input shift m (NormProp's
    ReLU mean) is folded into the output as -m sum_k W_ik, never applied to x.
    Not twice differentiable.
    """
    return _WeightNormLinear.apply(x, weight, gain, bias, float(input_mean), eps)


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


def _autocast_off(x: torch.Tensor):
    """Autocast disabled for `x`'s device: the math below picks its own dtypes."""
    if x.device.type == "meta":  # no autocast there, nor anything to disable
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


# -- Batch Renormalization --------------------------------------------------------------


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
    # Saved: x and per-channel vectors, as BatchNorm saves.
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


def batch_renorm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 training: bool = False, momentum: float = 0.01, eps: float = 1e-5,
                 r_max: float = 3.0, d_max: float = 5.0, process_group=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275) of (N, C, *) `x`.

    In training, with mu_B, var_B the batch statistics of a channel,
    sigma_B = sqrt(var_B + eps) and sigma = sqrt(running_var + eps):

    .. math::
        r = \mathrm{clip}(\sigma_B / \sigma, 1 / r_{max}, r_{max}), \quad
        d = \mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max}) \\
        y = \mathrm{weight} \cdot ((x - \mu_B) / \sigma_B \cdot r + d) + \mathrm{bias}

    with r and d constants of the backward pass. Out of training it is
    batch normalization with the running statistics. Low-precision inputs
    are normalized in float32. With a `process_group` (torch.distributed),
    mu_B and var_B are those of the group's global batch.

    Returns:
        (y, new_running_mean, new_running_var): in training the statistics
        moved towards the batch ones by `momentum` (the variance unbiased, as
        in torch's BatchNorm), else the running statistics as given. The
        inputs are not modified: under torch.compile an in-place update would
        let AOTAutograd's partitioner recompute r and d from the updated
        statistics in the backward (pytorch/pytorch#197039), a silently wrong
        weight gradient.
    """
    # Low-precision inputs are normalized in float32; the statistics stay float32.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    view = (1, -1) + (1,) * (x.dim() - 2)
    weight = torch.ones_like(running_mean) if weight is None else weight
    bias = torch.zeros_like(running_mean) if bias is None else bias
    weight, bias = weight.to(work.dtype), bias.to(work.dtype)
    with _autocast_off(x):
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


# -- Online Normalization ---------------------------------------------------------------


def linear_scan(coef: torch.Tensor | float, drive: torch.Tensor, init: torch.Tensor
                ) -> torch.Tensor:
    """h_t = coef_t * h_{t-1} + drive_t along dim 0, with h_{-1} = init; returns all h_t.

    On CPU in float64 for (N, C) drives, the sequential loop, compiled
    (csrc/scan.cpp); elsewhere, and where it cannot be built, the Hillis-Steele
    scan of :func:`_linear_scan_eager`, which computes the same.
    """
    coef = torch.as_tensor(coef, dtype=drive.dtype, device=drive.device)
    if (drive.device.type == "cpu" and drive.dtype == torch.float64 and drive.dim() == 2
            and not _tracing() and (kernel := _native.module("scan")) is not None):
        return kernel.linear_scan(coef.expand(drive.shape), drive, init.expand(drive.shape[1]))
    return _linear_scan_eager(coef, drive, init)


def _linear_scan_eager(coef: torch.Tensor, drive: torch.Tensor, init: torch.Tensor
                       ) -> torch.Tensor:
    """`linear_scan` as a Hillis-Steele scan of the affine maps h -> coef_t h + drive_t:
    log2(N) steps of tensor operations, no division, so it stays as stable as the
    sequential loop (callers pass float64)."""
    # One coefficient for all: the composed ones vary along dim 0 only, so they are
    # kept as (N, 1, ...), the same products on N values instead of N * C.
    coef = coef.expand(drive.shape if coef.dim() else (drive.shape[0],) + (1,) * (drive.dim() - 1))
    step = 1
    while step < drive.shape[0]:
        # Compose each map with the one `step` places earlier (computed before either changes).
        drive = torch.cat([drive[:step], torch.addcmul(drive[step:], coef[step:], drive[:-step])])
        coef = torch.cat([coef[:step], coef[step:] * coef[:-step]])
        step *= 2
    return torch.addcmul(drive, coef, init)


def _before_each(init: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The state each sample sees: init for the first, then the state after the previous one."""
    return torch.cat([init.unsqueeze(0), states[:-1]])


def _affine_clamp(y: torch.Tensor, weight, bias, clamp_val: float | None) -> torch.Tensor:
    """gamma * y + beta (per channel of an (N, C, S) tensor), clamped to +-clamp_val if given."""
    rows = y.shape[:2]
    out = y if weight is None else scale_shift(y, weight.expand(rows), bias.expand(rows))
    if clamp_val is not None:
        out = out.clamp(-clamp_val, clamp_val) if out is y else out.clamp_(-clamp_val, clamp_val)
    return out


def _online_kernel(x: torch.Tensor):
    """The compiled passes of csrc/activations.cpp where they serve x, else None: the eager
    torch path, their specification, runs instead."""
    return _native.for_tensor("activations", x, openmp=True)


def _affine_or_identity(weight, bias, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) per channel: weight and bias, or ones and zeros without them."""
    if weight is not None:
        return weight, bias
    return like.new_ones(like.shape[1]), like.new_zeros(like.shape[1])


def _bound(clamp_val: float | None) -> float:
    """The kernels' clamp bound: infinity stands for no clamp."""
    return math.inf if clamp_val is None else clamp_val


def _sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over positions of each (sample, channel) row of (N, C, S), float64.

    Sum and sum of squares in one fused pass (torch.var_mean is several times
    slower on CPU); the variance is then E[x^2] - E[x]^2, exact in float64 and
    accurate in float32 while |mean| / std stays below ~1e3.
    """
    positions = x.shape[-1]
    square_sum, total = row_sums(x, x)
    mean, second = total.double() / positions, square_sum.double() / positions
    return mean, (second - mean * mean).clamp_(min=0)


class OnlineNormFunction(torch.autograd.Function):
    """Online normalization of an (N, C, S) tensor, its affine map and its "ac" clamp.

    Forward updates `running_mean`/`running_var` in place; backward runs the
    control process and updates `mean_control`/`correlation_control` in place.
    Saved for backward: the normalized output y and per-(sample, channel) scalars.

    With `ranks` (a `RankSlice`), x is this rank's slice of the group's
    global batch: the per-(sample, channel) scalars are gathered so that both
    processes run over the global stream, in rank order, on every rank, and
    each rank keeps its own rows. The state then ends equal on every rank.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, mean_control,
                correlation_control, alpha_fwd: float, alpha_bkw: float, eps: float,
                clamp_val: float | None, ranks: RankSlice | None = None):
        mean, var = _sample_moments(x)
        if ranks is not None:
            mean, var = ranks.gather(torch.stack([mean, var], 1)).unbind(1)
        mu0, var0 = running_mean.double(), running_var.double()
        means_after = linear_scan(alpha_fwd, (1 - alpha_fwd) * mean, mu0)
        mu_before = _before_each(mu0, means_after)
        deviation = mean - mu_before
        var_drive = (1 - alpha_fwd) * var + alpha_fwd * (1 - alpha_fwd) * deviation ** 2
        variances_after = linear_scan(alpha_fwd, var_drive, var0)
        inv_std = (_before_each(var0, variances_after) + eps).rsqrt()
        running_mean.copy_(means_after[-1])
        running_var.copy_(variances_after[-1])

        scale, shift = inv_std, -mu_before * inv_std
        if ranks is not None:
            scale, shift = ranks.mine(scale), ranks.mine(shift)
        kernel = _online_kernel(x)
        if kernel is not None and (weight is not None or clamp_val is not None):
            affine = _affine_or_identity(weight, bias, x)
            y, out = kernel.online_forward(x, scale.to(x.dtype), shift.to(x.dtype), *affine,
                                           _bound(clamp_val))
        else:
            y = scale_shift(x, scale, shift)
            out = _affine_clamp(y, weight, bias, clamp_val)
        # mean(y) and mean(y^2) of each sample follow from its moments: no pass over y.
        y_mean = deviation * inv_std
        y_square_mean = (var + deviation ** 2) * inv_std ** 2
        ctx.save_for_backward(y, weight, bias, inv_std, y_mean, y_square_mean)
        ctx.control = (mean_control, correlation_control)
        ctx.alpha_bkw, ctx.clamp_val, ctx.ranks = alpha_bkw, clamp_val, ranks
        return out

    @staticmethod
    @once_differentiable  # the control process is not a true gradient to differentiate again
    def backward(ctx, grad_out):
        y, weight, bias, inv_std, y_mean, y_square_mean = ctx.saved_tensors
        mean_control, correlation_control = ctx.control
        leak = 1 - ctx.alpha_bkw
        # grad_z: grad_out through the clamp's mask; the gradient w.r.t. y is weight * grad_z,
        # never materialized. The kernel recomputes the mask in each of its two passes.
        kernel = _online_kernel(y)
        if kernel is not None:
            affine, bound = _affine_or_identity(weight, bias, y), _bound(ctx.clamp_val)
            grad_z_dot_y, grad_z_sum = kernel.online_backward_sums(grad_out, y, *affine, bound)
        else:
            grad_z = grad_out
            if ctx.clamp_val is not None:
                z = _affine_clamp(y, weight, bias, None)
                # z's buffer takes grad_z, then grad_x: a fresh activation-sized buffer costs
                # its page faults, about a pass. Without weight z is y, which is still needed.
                grad_z = clamp_backward(grad_out, z, ctx.clamp_val, out=None if z is y else z)
            grad_z_dot_y, grad_z_sum = (t.double() for t in row_sums(grad_z, y))
        gamma = 1.0 if weight is None else weight.double()
        positions = y.shape[-1]
        grad_y_dot_y_mean = gamma * grad_z_dot_y / positions
        grad_y_mean = gamma * grad_z_sum / positions
        v0, u0 = correlation_control.double(), mean_control.double()
        ranks = ctx.ranks
        if ranks is not None:
            grad_y_dot_y_mean, grad_y_mean = ranks.gather(
                torch.stack([grad_y_dot_y_mean, grad_y_mean], 1)).unbind(1)
            # Each rank's gradients are the global mean loss's times the group size (DDP
            # averages the ranks' gradients): the state, linear in them, is kept in the
            # global loss's units, as in one process.
            v0, u0 = v0 * ranks.world_size, u0 * ranks.world_size

        # v_t = v_{t-1} + mean(g~_t y_t) = (1 - leak mean(y_t^2)) v_{t-1} + mean(g_t y_t)
        vs = linear_scan(1 - leak * y_square_mean, grad_y_dot_y_mean, v0)
        v_before = _before_each(v0, vs)
        # u_t = u_{t-1} + mean(x'_t) = alpha_bkw u_{t-1} + inv_std_t mean(g~_t)
        u_drive = inv_std * (grad_y_mean - leak * v_before * y_mean)
        us = linear_scan(ctx.alpha_bkw, u_drive, u0)
        u_before = _before_each(u0, us)
        if ranks is None:
            correlation_control.copy_(vs[-1])
            mean_control.copy_(us[-1])
        else:
            correlation_control.copy_(vs[-1] / ranks.world_size)
            mean_control.copy_(us[-1] / ranks.world_size)
            v_before, u_before, inv_std = map(ranks.mine, (v_before, u_before, inv_std))

        # x'_t = (g_t - leak v_{t-1} y_t) inv_std_t - leak u_{t-1}
        grad_scale, grad_shift = gamma * inv_std, -leak * u_before
        y_scale = -leak * v_before * inv_std
        if kernel is not None:
            per_row = (t.to(y.dtype) for t in (grad_scale, grad_shift, y_scale))
            grad_x = kernel.online_backward_input(grad_out, y, *affine, bound, *per_row)
        else:
            grad_x = scale_shift(grad_z, grad_scale, grad_shift,
                                 out=None if grad_z is grad_out else grad_z)
            grad_x.addcmul_(y, y_scale[..., None].to(y.dtype))
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = column_sums(grad_z_dot_y).to(weight.dtype)
            grad_bias = column_sums(grad_z_sum).to(bias.dtype)
        return (grad_x, grad_weight, grad_bias) + (None,) * 9


def online_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                mean_control: torch.Tensor, correlation_control: torch.Tensor,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                training: bool = False, alpha_fwd: float = 0.999, alpha_bkw: float = 0.99,
                eps: float = 1e-5, ecm: str | None = "ac", ls_eps: float = 1e-5,
                clamp_val: float = 5.0, process_group=None) -> torch.Tensor:
    r"""Online Normalization (Chiley et al. 2019, arXiv:1905.05894) of (N, C, *) `x`.

    Per channel the samples form one stream. With m_t, s2_t the mean and biased
    variance of sample t over its positions (m_t = x_t, s2_t = 0 for (N, C)):

    .. math::
        y_t = (x_t - \mu_{t-1}) / \sqrt{\sigma^2_{t-1} + \epsilon} \\
        \sigma^2_t = a_f \sigma^2_{t-1} + (1 - a_f) s2_t + a_f (1 - a_f)(m_t - \mu_{t-1})^2 \\
        \mu_t = a_f \mu_{t-1} + (1 - a_f) m_t

    and the output is ``ECM(weight * y + bias)``: ``"ac"`` clamps to
    +-clamp_val, ``"ls"`` divides each sample by sqrt(mean of its squares +
    ls_eps), None is the identity. In training, mu and sigma^2 start from
    (and end in) `running_mean`/`running_var`, and the backward pass, with
    g_t the gradient of y_t, runs the control process (u, v start from and
    end in `mean_control`/`correlation_control`):

    .. math::
        \tilde g_t = g_t - (1 - a_b) v_{t-1} y_t, \quad
        v_t = v_{t-1} + \mathrm{mean}(\tilde g_t y_t) \\
        x'_t = \tilde g_t / \sqrt{\sigma^2_{t-1} + \epsilon} - (1 - a_b) u_{t-1}, \quad
        u_t = u_{t-1} + \mathrm{mean}(x'_t)

    Both are linear recurrences, computed for the whole batch at once with
    prefix scans in float64. Out of training y uses the running statistics,
    which stay unchanged. Low-precision inputs are normalized in float32.

    With a `process_group` (torch.distributed), the group's global batch is
    one stream, rank k's samples after rank k-1's, and every rank ends with
    the same state.
    """
    # Explicit sizes: a synced process may hold no sample (reported below, on every rank).
    flat = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    weight = None if weight is None else weight.to(work.dtype)
    bias = None if bias is None else bias.to(work.dtype)
    clamp = clamp_val if ecm == "ac" else None
    with _autocast_off(x):
        if training:
            ranks = None
            if process_group is not None:
                ranks = RankSlice.of(work.shape[0], process_group, x.device)
                ranks.require_rows("Online Normalization")
            out = OnlineNormFunction.apply(work, weight, bias, running_mean, running_var,
                                           mean_control, correlation_control, alpha_fwd,
                                           alpha_bkw, eps, clamp, ranks)
        else:
            inv_std = (running_var.to(work.dtype) + eps).rsqrt()[:, None]
            y = (work - running_mean.to(work.dtype)[:, None]) * inv_std
            out = _affine_clamp(y, weight, bias, clamp)
        if ecm == "ls":
            second_moment = out.square().mean((1, 2), keepdim=True)
            out = out / (second_moment + ls_eps).sqrt()
    return out.to(x.dtype).reshape(x.shape)


# -- Equilibrium Normalization ----------------------------------------------------------


def equilibrium_shift_scale(weight: torch.Tensor, input_mean: torch.Tensor,
                            positions_ratio: float = 1.0, groups: int = 1,
                            single_pass: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """b and s of Equilibrium Normalization (w'' = s (w + b)), with v_c = N H W m_c,
    r = N H W r_bar (Defazio and Bottou, arXiv:1812.04549, section 4).

    With w_dc = sum_jk w_dcjk and K the kernel size (kh kw)::

        b_d   = -sum_c m_c w_dc / (K sum_c m_c)
        w'_dc = sum_jk (w_dcjk + b_d) [w_dcjk + b_d > 0]              (two-pass)
              = sum_jk w_dcjk [w_dcjk > 0] + b_d #{jk: w_dcjk > 0}     (single-pass)
        s_d   = r_bar / sum_c m_c w'_dc

    Args:
        weight: (out, in / groups, *kernel); a Linear weight (out, in) is the 1x1 case.
        input_mean: (in,), m_c, the mean of each input channel.
        positions_ratio: r_bar = H_out W_out stride_h stride_w / (H W); 1 for a Linear.
        groups: output channel d sees the input channels of its group only.
        single_pass: the one-pass approximation (signs assumed unchanged by b).

    Returns:
        (b, s), each of shape (out,).

    A denominator that is (near) zero, which the paper excludes by assumption,
    is replaced by a small positive one: finite, never NaN. Run
    eagerly, that warns; under torch.compile or torch.export the check,
    which needs the values on the host, is skipped.
    """
    shift, scale, row_max = unit_row_shift_scale(weight, input_mean, positions_ratio, groups,
                                                 single_pass)
    return shift * row_max, scale / row_max


def unit_row_shift_scale(weight: torch.Tensor, input_mean: torch.Tensor,
                         positions_ratio: float = 1.0, groups: int = 1,
                         single_pass: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b^, s^, m): b and s of each row divided by its largest |w|, and m, so that
    b = b^ m and s = s^ / m (b is of degree 1 and s of degree -1 in the row).

    m is a constant (no gradient), so the gradient is unchanged. For a tiny row
    s overflows the dtype where s^ (w / m + b^), the normalized kernel, does not.
    Arguments as :func:`equilibrium_shift_scale`.
    """
    out_channels = weight.shape[0]
    row_max = weight.detach().abs().flatten(1).amax(1)
    row_max = torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    kernel = (weight / row_max.view(-1, *[1] * (weight.dim() - 1))).reshape(
        out_channels, weight.shape[1], -1)  # (d, c, jk)
    mean = _row_input_means(input_mean, weight, groups)
    # A denominator is degenerate when it is tiny next to the same sum taken
    # over absolute values: a threshold with the method's scale invariances.
    # The floors are differentiated through, as the sums they stand in for: the
    # gradient stays that of the function computed.
    floor_scale = _floor_scale(weight.dtype)
    input_floor = floor_scale * mean.abs().sum(1)
    contribution_floor = floor_scale * (mean.abs() * kernel.abs().sum(2)).sum(1)
    input_sum = _guarded(mean.sum(1), input_floor, _INPUT_SUM)
    shift = -(mean * kernel.sum(2)).sum(1) / (kernel.shape[2] * input_sum)
    if single_pass:
        positive = kernel > 0
        positive_sum = (kernel * positive).sum(2) + shift[:, None] * positive.sum(2)
    else:
        positive_sum = (kernel + shift[:, None, None]).clamp(min=0).sum(2)
    contribution = _guarded((mean * positive_sum).sum(1), contribution_floor, _CONTRIBUTION)
    return shift, positions_ratio / contribution, row_max


# The denominators that may fall back to a floor, as the warnings name them.
_INPUT_SUM = "the input sum sum_c v_c"
_CONTRIBUTION = "the positive weights' contribution sum_c v_c w'_dc"


def _floor_scale(dtype: torch.dtype) -> float:
    """A denominator under this times the same sum over absolute values is degenerate."""
    return math.sqrt(torch.finfo(dtype).eps)


def _row_input_means(input_mean: torch.Tensor, weight: torch.Tensor, groups: int
                     ) -> torch.Tensor:
    """(out, in / groups): the means of the input channels each output row sees."""
    out_channels = weight.shape[0]
    mean = input_mean.to(weight.dtype).reshape(groups, 1, -1)
    return mean.expand(-1, out_channels // groups, -1).reshape(out_channels, -1)


def _guarded(denominator: torch.Tensor, floor: torch.Tensor, what: str) -> torch.Tensor:
    degenerate = denominator.abs() <= floor
    if not _tracing():  # the check reads values on the host: it cannot be traced
        _warn_degenerate(degenerate, what)
    # Positive: the sign of a (near) zero sum is often rounding noise (a row of one
    # sign cancels exactly against its shift), and must not flip the output.
    fallback = floor
    # A zero floor means zero inputs or zero weights: the numerator is zero too.
    fallback = torch.where(fallback == 0, torch.ones_like(fallback), fallback)
    return torch.where(degenerate, fallback, denominator)


def _warn_degenerate(degenerate: torch.Tensor, what: str) -> None:
    if degenerate.device.type != "meta" and degenerate.any():
        warnings.warn(
            f"EquiNorm: {what} is (near) zero for output channel(s) "
            f"{degenerate.nonzero().flatten().tolist()}: the channel's weights all share one "
            f"sign after the shift, or its inputs are zero or cancel (Equilibrium "
            f"Normalization assumes non-negative inputs and mixed-sign kernels); using a small "
            f"denominator instead", RuntimeWarning, stacklevel=4)


def equi_norm(weight: torch.Tensor, input_mean: torch.Tensor, gain: torch.Tensor,
              positions_ratio: float = 1.0, groups: int = 1, single_pass: bool = True
              ) -> torch.Tensor:
    """The kernel Equilibrium Normalization applies: gain_d s_d (w_d + b_d) for each output d.

    b and s are those of :func:`equilibrium_shift_scale` (same arguments),
    differentiable in `weight` and `input_mean`; `gain` (out,) is the learned
    length. A conv2d (or linear) with this kernel is the EquiNorm layer. On CPU
    (float32, float64, out of tracing) the transform and its gradient run compiled,
    once differentiable; elsewhere the torch operations of `unit_row_shift_scale`.
    """
    kernel = _native.for_tensor("equinorm", weight)
    if kernel is not None and gain.dtype == weight.dtype:
        return _CompiledEquiNorm.apply(weight, input_mean, gain, positions_ratio, groups,
                                       single_pass, kernel)
    shift, scale, row_max = unit_row_shift_scale(weight, input_mean, positions_ratio, groups,
                                                 single_pass)
    per_channel = (-1,) + (1,) * (weight.dim() - 1)
    unit_rows = weight / row_max.view(per_channel)  # s = s^ / m can overflow: never formed
    return (gain * scale).view(per_channel) * (unit_rows + shift.view(per_channel))


class _CompiledEquiNorm(torch.autograd.Function):
    """`equi_norm` on CPU in one compiled call each way (csrc/equinorm.cpp): the eager
    path's ~90 tensor operations forward and ~150 backward per layer cost more than the
    convolution on a small kernel. Its gradient is the eager path's, written out."""

    @staticmethod
    def forward(ctx, weight, input_mean, gain, positions_ratio: float, groups: int,
                single_pass: bool, kernel):
        rows = weight.reshape(weight.shape[0], weight.shape[1], -1)
        mean = _row_input_means(input_mean, weight, groups)
        floor_scale = _floor_scale(weight.dtype)
        out, *solved = kernel.forward(rows, mean, gain, positions_ratio, single_pass,
                                      floor_scale)
        guards = solved[-1]
        for taken, what in zip(guards, (_INPUT_SUM, _CONTRIBUTION)):
            _warn_degenerate(taken != 0, what)
        ctx.save_for_backward(rows, mean, gain, *solved)
        ctx.kernel, ctx.single_pass, ctx.floor_scale = kernel, single_pass, floor_scale
        ctx.groups, ctx.mean_dtype = groups, input_mean.dtype
        return out.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, mean, gain, *solved = ctx.saved_tensors
        grad_rows, grad_mean, grad_gain = ctx.kernel.backward(
            grad.reshape(rows.shape), rows, mean, gain, *solved, ctx.single_pass,
            ctx.floor_scale)
        # each input channel's mean feeds the rows of its group
        grad_input_mean = grad_mean.reshape(ctx.groups, -1, mean.shape[1]).sum(1).flatten()
        return (grad_rows.view(grad.shape), grad_input_mean.to(ctx.mean_dtype), grad_gain,
                None, None, None, None)

"""Online Normalization (Chiley et al. 2019, arXiv:1905.05894): the forward's running
statistics, the backward's control process, and the linear scan both run on."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .._ext import loader as _native
from .._ext.loader import tracing as _tracing
from ..distributed import RankSlice
from .aten_helpers import (
    autocast_off,
    clamp_backward,
    column_sums,
    in_dtype,
    in_memory_format_of,
    row_sums,
    scale_shift,
)

ONLINE_NORM_ECMS = ("ls", "ac", None)


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
    This is the specification: on CPU in float32/float64, in one process, `online_norm`
    runs the compiled step instead (csrc/activations.cpp, online_norm_train: the sequential
    loops the scans below stand in for, one call each way, the autograd function in C++).
    With `ranks`, or where the kernel serves, its row passes run compiled here.

    With `ranks` (a `RankSlice`), x is this rank's slice of the group's
    global batch: the per-(sample, channel) scalars are gathered so that both
    processes run over the global stream, in rank order, on every rank, and
    each rank keeps its own rows. The state then ends equal on every rank.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, mean_control,
                correlation_control, alpha_fwd: float, alpha_bkw: float, eps: float,
                clamp_val: float | None, ranks: RankSlice | None = None):
        ctx.control = (mean_control, correlation_control)
        ctx.alpha_bkw, ctx.clamp_val, ctx.ranks = alpha_bkw, clamp_val, ranks
        kernel = _online_kernel(x)
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
        return out

    @staticmethod
    @once_differentiable  # the control process is not a true gradient to differentiate again
    def backward(ctx, grad_out):
        y, weight, bias, inv_std, y_mean, y_square_mean = ctx.saved_tensors
        mean_control, correlation_control = ctx.control
        leak = 1 - ctx.alpha_bkw
        kernel = _online_kernel(y)
        # grad_z: grad_out through the clamp's mask; the gradient w.r.t. y is weight * grad_z,
        # never materialized. The kernel recomputes the mask in each of its two passes.
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


class LayerScale(torch.autograd.Function):
    """Online Normalization's "ls" error compensation of (N, ...) `z`: each sample divided by
    sqrt(mean of its squares + eps).

    A Function, not torch operations, for its cost: autograd through square, mean,
    sqrt and div keeps several activation-sized temporaries and needs about eight
    passes; this saves only the output (already alive) and one scalar per sample.
    With o = z / r and M values per sample, the gradient is (g - o mean(g o)) / r.

    On CPU in float32/float64 each direction is one compiled call (csrc/activations.cpp,
    layer_scale_forward/backward: two passes over a sample, no temporaries); the torch
    operations below are their specification. The compiled Online step runs the same calls
    itself, in place on its output.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, eps: float) -> torch.Tensor:
        flat = z.reshape(z.shape[0], math.prod(z.shape[1:]))  # explicit: N may be 0
        ctx.kernel = _online_kernel(flat)
        if ctx.kernel is not None:
            out, inv_rms = ctx.kernel.layer_scale_forward(flat, eps, False)
        else:
            mean_square = torch.linalg.vector_norm(flat, dim=1).square() / flat.shape[1]
            inv_rms = (mean_square + eps).rsqrt()
            out = flat * inv_rms[:, None]
        ctx.save_for_backward(out, inv_rms)
        return out.view(z.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, inv_rms = ctx.saved_tensors
        flat = grad.reshape(out.shape)
        if ctx.kernel is not None:
            return ctx.kernel.layer_scale_backward(flat, out, inv_rms).view(grad.shape), None
        # (a batched matrix product here is a GEMV per sample: ten times slower on CPU)
        mean_dot = (flat * out).sum(1) / out.shape[1]
        grad_z = torch.addcmul(flat, out, -mean_dot[:, None]).mul_(inv_rms[:, None])
        return grad_z.view(grad.shape), None


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
    prefix scans in float64 (on CPU in one process, by the compiled step's
    sequential float64 loops instead; for (N, C) inputs it computes
    1 / sqrt(sigma^2 + eps) in x's dtype). Out of training y uses the
    running statistics, which stay unchanged. Low-precision inputs are
    normalized in float32. The output is in x's memory format (channels_last
    and channels_last_3d kept).

    With a `process_group` (torch.distributed), the group's global batch is
    one stream, rank k's samples after rank k-1's, and every rank ends with
    the same state.
    """
    work = in_dtype(x, x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    weight, bias = in_dtype(weight, work.dtype), in_dtype(bias, work.dtype)
    clamp = clamp_val if ecm == "ac" else None
    with autocast_off(x):
        kernel = _online_kernel(work) if training and process_group is None else None
        if kernel is not None:
            # one compiled call each way, on x as it is (a channels_last layout read and
            # kept), layer scaling included, no Python in the backward: at batch 1 and 2 the
            # torch operations of OnlineNormFunction, and its Python, cost more than the passes
            out = kernel.online_norm_train(
                work, *_affine_or_identity(weight, bias, work), running_mean, running_var,
                mean_control, correlation_control, alpha_fwd, alpha_bkw, eps, _bound(clamp),
                ecm == "ls", ls_eps)
            return in_dtype(out, x.dtype)
        # Explicit sizes: a synced process may hold no sample (reported below, on every rank).
        flat = work.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        if training:
            ranks = None
            if process_group is not None:
                ranks = RankSlice.of(flat.shape[0], process_group, x.device)
                ranks.require_rows("Online Normalization")
            out = OnlineNormFunction.apply(flat, weight, bias, running_mean, running_var,
                                           mean_control, correlation_control, alpha_fwd,
                                           alpha_bkw, eps, clamp, ranks)
        else:
            inv_std = (running_var.to(flat.dtype) + eps).rsqrt()[:, None]
            y = (flat - running_mean.to(flat.dtype)[:, None]) * inv_std
            out = _affine_clamp(y, weight, bias, clamp)
        if ecm == "ls":
            out = LayerScale.apply(out, ls_eps)
    return in_memory_format_of(in_dtype(out, x.dtype).reshape(x.shape), x)

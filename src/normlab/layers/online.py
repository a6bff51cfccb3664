"""Online Normalization (Chiley et al. 2019): normalization without batches.

Every channel sees the samples as one stream, in order. The forward pass
normalizes each sample with running statistics computed from the samples
*before* it; the backward pass runs a control process that removes, from the
gradient, its projections on 1 and on the output, the two conditions the true
normalization gradient satisfies. Both processes are linear recurrences over
the samples, so a whole batch is computed at once with prefix scans.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..distributed import RankSlice
from .channel_norm import ChannelNorm

ECM_CHOICES = ("ls", "ac", None)


def linear_scan(coef: torch.Tensor | float, drive: torch.Tensor, init: torch.Tensor
                ) -> torch.Tensor:
    """h_t = coef_t * h_{t-1} + drive_t along dim 0, with h_{-1} = init; returns all h_t.

    A Hillis-Steele scan of the affine maps h -> coef_t h + drive_t: log2(N)
    steps of tensor operations, no division, so it stays as stable as the
    sequential loop (callers pass float64).
    """
    coef = torch.as_tensor(coef, dtype=drive.dtype).expand_as(drive)
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


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift for (N, C, S) x and one scale and shift per (sample, channel) row.

    Runs on torch's batch-norm inference kernel (mean 0, variance 1, eps 0): one
    vectorized pass, where a broadcasting addcmul is several times slower on CPU.
    """
    rows = x.shape[0] * x.shape[1]
    zeros = x.new_zeros(rows)
    out = F.batch_norm(x.reshape(1, rows, -1), zeros, zeros + 1, scale.reshape(rows).to(x.dtype),
                       shift.reshape(rows).to(x.dtype), training=False, momentum=0.0, eps=0.0)
    return out.view_as(x)


def row_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(a * b) and sum(a) over each (sample, channel) row of (N, C, S) tensors, as (N, C).

    One fused pass over both tensors, on torch's batch-norm backward kernel
    (mean 0, inverse std 1), which reduces exactly these two sums per channel.
    """
    rows = a.shape[0] * a.shape[1]
    zeros = a.new_zeros(rows)
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        a.reshape(1, rows, -1), b.reshape(1, rows, -1), None, None, None, zeros, zeros + 1,
        True, 0.0, [False, True, True])
    return dot.view(a.shape[:2]), total.view(a.shape[:2])


def _affine_ecm(y: torch.Tensor, weight, bias, clamp_val: float | None) -> torch.Tensor:
    """gamma * y + beta (per channel of an (N, C, S) tensor), clamped to +-clamp_val if given."""
    rows = y.shape[:2]
    out = y if weight is None else scale_shift(y, weight.expand(rows), bias.expand(rows))
    if clamp_val is not None:
        out = out.clamp(-clamp_val, clamp_val) if out is y else out.clamp_(-clamp_val, clamp_val)
    return out


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

        if ranks is None:
            y = scale_shift(x, inv_std, -mu_before * inv_std)
        else:
            my_inv_std = ranks.mine(inv_std)
            y = scale_shift(x, my_inv_std, -ranks.mine(mu_before) * my_inv_std)
        # mean(y) and mean(y^2) of each sample follow from its moments: no pass over y.
        y_mean = deviation * inv_std
        y_square_mean = (var + deviation ** 2) * inv_std ** 2
        ctx.save_for_backward(y, weight, bias, inv_std, y_mean, y_square_mean)
        ctx.control = (mean_control, correlation_control)
        ctx.alpha_bkw, ctx.clamp_val, ctx.ranks = alpha_bkw, clamp_val, ranks
        return _affine_ecm(y, weight, bias, clamp_val)

    @staticmethod
    @once_differentiable  # the control process is not a true gradient to differentiate again
    def backward(ctx, grad_out):
        y, weight, bias, inv_std, y_mean, y_square_mean = ctx.saved_tensors
        mean_control, correlation_control = ctx.control
        leak = 1 - ctx.alpha_bkw
        grad_z = grad_out
        if ctx.clamp_val is not None:
            pre_clamp = _affine_ecm(y, weight, bias, None)
            grad_z = torch.ops.aten.hardtanh_backward(grad_out, pre_clamp, -ctx.clamp_val,
                                                      ctx.clamp_val)
        # One fused reduction pass; the gradient w.r.t. y is weight * grad_z, never materialized.
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
        grad_x = scale_shift(grad_z, gamma * inv_std, -leak * u_before)
        grad_x.addcmul_(y, (-leak * v_before * inv_std)[..., None].to(y.dtype))
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = grad_z_dot_y.sum(0).to(weight.dtype)
            grad_bias = grad_z_sum.sum(0).to(bias.dtype)
        return (grad_x, grad_weight, grad_bias) + (None,) * 9


class _OnlineNorm(ChannelNorm):
    def __init__(self, num_features: int, alpha_fwd: float = 0.999, alpha_bkw: float = 0.99,
                 eps: float = 1e-5, affine: bool = True, ecm: str | None = "ac",
                 ls_eps: float = 1e-5, clamp_val: float = 5.0, *, sync: bool = False,
                 process_group=None):
        super().__init__(num_features, affine, sync, process_group)
        for name, alpha in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0 < alpha < 1:
                raise ValueError(f"{name} must be in (0, 1), got {alpha}")
        if ecm not in ECM_CHOICES:
            raise ValueError(f"ecm must be one of {ECM_CHOICES}, got {ecm!r}")
        if eps <= 0 or ls_eps <= 0 or clamp_val <= 0:
            raise ValueError(f"eps, ls_eps and clamp_val must be > 0, got {eps}, {ls_eps}, "
                             f"{clamp_val}")
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.eps, self.ecm = eps, ecm
        self.ls_eps, self.clamp_val = ls_eps, clamp_val
        self.register_buffer("mean_control", torch.zeros(num_features))  # u
        self.register_buffer("correlation_control", torch.zeros(num_features))  # v
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.mean_control.zero_()
        self.correlation_control.zero_()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"eps={self.eps}, affine={self.affine}, ecm={self.ecm!r}" + self._sync_repr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # Explicit sizes: a synced process may hold no sample (reported below, on every rank).
        flat = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
        # Low-precision inputs are normalized in float32; the state stays in its own dtype.
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        weight = None if self.weight is None else self.weight.to(work.dtype)
        bias = None if self.bias is None else self.bias.to(work.dtype)
        clamp_val = self.clamp_val if self.ecm == "ac" else None
        with torch.autocast(x.device.type, enabled=False):
            if self.training:
                group = self.sync_group() if self.sync else None
                ranks = None
                if group is not None:
                    ranks = RankSlice.of(work.shape[0], group, x.device)
                    ranks.require_rows(type(self).__name__)
                out = OnlineNormFunction.apply(
                    work, weight, bias, self.running_mean, self.running_var, self.mean_control,
                    self.correlation_control, self.alpha_fwd, self.alpha_bkw, self.eps, clamp_val,
                    ranks)
            else:
                inv_std = (self.running_var.to(work.dtype) + self.eps).rsqrt()[:, None]
                y = (work - self.running_mean.to(work.dtype)[:, None]) * inv_std
                out = _affine_ecm(y, weight, bias, clamp_val)
            if self.ecm == "ls":
                second_moment = out.square().mean((1, 2), keepdim=True)
                out = out / (second_moment + self.ls_eps).sqrt()
        return out.to(x.dtype).reshape(x.shape)


class OnlineNorm1d(_OnlineNorm):
    r"""Online Normalization over (N, C) or (N, C, L) inputs (Chiley et al. 2019).

    Per channel the samples form one stream. With m_t, s2_t the mean and biased
    variance of sample t over L (m_t = x_t, s2_t = 0 for (N, C) input):

    .. math::
        y_t = (x_t - \mu_{t-1}) / \sqrt{\sigma^2_{t-1} + \epsilon} \\
        \sigma^2_t = a_f \sigma^2_{t-1} + (1 - a_f) s2_t + a_f (1 - a_f)(m_t - \mu_{t-1})^2 \\
        \mu_t = a_f \mu_{t-1} + (1 - a_f) m_t

    and the output is ``ECM(weight * y + bias)``. Backward, with g_t the
    gradient of y_t, the control process (u, v start at 0) gives

    .. math::
        \tilde g_t = g_t - (1 - a_b) v_{t-1} y_t, \quad
        v_t = v_{t-1} + \mathrm{mean}(\tilde g_t y_t) \\
        x'_t = \tilde g_t / \sqrt{\sigma^2_{t-1} + \epsilon} - (1 - a_b) u_{t-1}, \quad
        u_t = u_{t-1} + \mathrm{mean}(x'_t)

    In eval mode y uses the running statistics, which stay unchanged.

    Args:
        num_features: C.
        alpha_fwd: a_f, decay of the running statistics. Default: 0.999.
        alpha_bkw: a_b, decay of the gradient control. Default: 0.99.
        eps: added to the variance. Default: 1e-5.
        affine: learnable per-channel ``weight`` and ``bias``. Default: True.
        ecm: error compensation: ``"ac"`` clamps to +-clamp_val, ``"ls"``
            divides each sample by sqrt(mean of its squares + ls_eps), None.
        ls_eps, clamp_val: see ecm. Defaults: 1e-5, 5.0.
        sync: under DistributedDataParallel, the global batch of `process_group`
            (None: the world group) is one stream, rank k's samples after rank
            k-1's: the forward and control processes run over it on every rank,
            so the four buffers stay equal across ranks (DDP's default
            ``broadcast_buffers=True`` then copies equal values: correct, and
            ``False`` saves the copy). See `normlab.convert_sync`. Default:
            False, each process's batch is a stream of its own (under DDP with
            broadcast_buffers, rank 0's state then overwrites the others').

    The buffers ``running_mean``, ``running_var`` (mu, var) and
    ``mean_control``, ``correlation_control`` (u, v) are in the state_dict.

    Shape:
        - Input: (N, C) or (N, C, L)
        - Output: same shape as the input

    Example:
        >>> norm = OnlineNorm1d(64)
        >>> out = norm(torch.randn(1, 64))  # batch size 1 is fine
    """

    _input_dims = (2, 3)


class OnlineNorm2d(_OnlineNorm):
    r"""Online Normalization over (N, C, H, W) inputs (Chiley et al. 2019).

    The math of :class:`OnlineNorm1d`, with m_t and s2_t the mean and biased
    variance of sample t over the H * W positions and the backward means taken
    over the same positions.

    Shape:
        - Input: (N, C, H, W)
        - Output: (N, C, H, W)

    Example:
        >>> norm = OnlineNorm2d(64, ecm="ls")
        >>> out = norm(torch.randn(8, 64, 32, 32))
    """

    _input_dims = (4,)

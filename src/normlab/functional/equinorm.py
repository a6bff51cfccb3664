"""Equilibrium Normalization's effective kernel (Defazio and Bottou,
arXiv:1812.04549)."""

from __future__ import annotations

import math
import warnings

import torch
from torch.autograd.function import once_differentiable

from .._ext import loader as _native
from .._ext.loader import tracing as _tracing
from .aten_helpers import in_dtype


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
    kernel = _native.for_tensor("equinorm", weight, openmp=True)
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
        mean = in_dtype(input_mean, weight.dtype).reshape(groups, -1)
        floor_scale = _floor_scale(weight.dtype)
        out, *solved = kernel.forward(rows, mean, gain, positions_ratio, single_pass,
                                      floor_scale)
        guards = solved[-1]
        if guards.any():  # one check for the usual case, where neither is degenerate
            for taken, what in zip(guards.t(), (_INPUT_SUM, _CONTRIBUTION)):
                _warn_degenerate(taken != 0, what)
        ctx.save_for_backward(rows, mean, gain, *solved)
        ctx.kernel, ctx.single_pass, ctx.floor_scale = kernel, single_pass, floor_scale
        ctx.mean_dtype = input_mean.dtype
        return out.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, mean, gain, *solved = ctx.saved_tensors
        grad_rows, grad_mean, grad_gain = ctx.kernel.backward(
            grad.reshape(rows.shape), rows, mean, gain, *solved, ctx.single_pass,
            ctx.floor_scale)
        return (grad_rows.view(grad.shape), in_dtype(grad_mean.flatten(), ctx.mean_dtype),
                grad_gain,
                None, None, None, None)

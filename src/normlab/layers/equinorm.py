"""Equilibrium Normalization (EquiNorm, seed 004): drop-in Linear and Conv2d layers.

EquiNorm normalizes the *weights* with statistics of the *input*: per output
channel d it shifts the kernel by b_d and scales it by s_d so that, over the
batch, the output's mean is zero and the positive weights contribute r (one
per output element); the negative weights then contribute -r.

Everything is written per input element: the paper's sums v_c = N H W m_c
(m_c the mean of input channel c) and r = N H_out W_out stride^2 enter only
through r / v, so the batch size cancels. That is what lets `stat_fraction`
take m from the first part of the batch, and a running estimate of m (kept
in ``running_mean``, BatchNorm-style) replace it in evaluation at any batch
size and image size.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from ..distributed import RankSlice, Syncable, all_reduce_sum


def equilibrium_shift_scale(weight: torch.Tensor, input_mean: torch.Tensor,
                            positions_ratio: float, groups: int = 1, single_pass: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """b and s of seed 004 section 4 (w'' = s (w + b)), with v_c = N H W m_c, r = N H W r_bar.

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
    is replaced by a small positive one with a warning: finite, never NaN.
    """
    shift, scale, row_max = unit_row_shift_scale(weight, input_mean, positions_ratio, groups,
                                                 single_pass)
    return shift * row_max, scale / row_max


def unit_row_shift_scale(weight: torch.Tensor, input_mean: torch.Tensor,
                         positions_ratio: float, groups: int = 1, single_pass: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b^, s^, m): b and s of each row divided by its largest |w|, m, so that
    b = b^ m and s = s^ / m (b is of degree 1 and s of degree -1 in the row).

    m is a constant (no gradient), so the gradient is unchanged. For a tiny row
    s overflows the dtype where s^ (w / m + b^), the normalized kernel, does not;
    b^ and s^ stay finite and their gradients too. Arguments as
    :func:`equilibrium_shift_scale`.
    """
    out_channels = weight.shape[0]
    row_max = weight.detach().abs().flatten(1).amax(1)
    row_max = torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    kernel = (weight / row_max.view(-1, *[1] * (weight.dim() - 1))).reshape(
        out_channels, weight.shape[1], -1)  # (d, c, jk)
    mean = input_mean.to(weight.dtype).reshape(groups, 1, -1)
    mean = mean.expand(-1, out_channels // groups, -1).reshape(out_channels, -1)  # (d, c)
    # A denominator is degenerate when it is tiny next to the same sum taken
    # over absolute values: a threshold with the method's scale invariances.
    # The floors are differentiated through, as the sums they stand in for: the
    # gradient stays that of the function computed.
    floor_scale = math.sqrt(torch.finfo(weight.dtype).eps)
    input_floor = floor_scale * mean.abs().sum(1)
    contribution_floor = floor_scale * (mean.abs() * kernel.abs().sum(2)).sum(1)
    input_sum = _guarded(mean.sum(1), input_floor, "the input sum sum_c v_c")
    shift = -(mean * kernel.sum(2)).sum(1) / (kernel.shape[2] * input_sum)
    if single_pass:
        positive = kernel > 0
        positive_sum = (kernel * positive).sum(2) + shift[:, None] * positive.sum(2)
    else:
        positive_sum = (kernel + shift[:, None, None]).clamp(min=0).sum(2)
    contribution = _guarded((mean * positive_sum).sum(1), contribution_floor,
                            "the positive weights' contribution sum_c v_c w'_dc")
    return shift, positions_ratio / contribution, row_max


def _guarded(denominator: torch.Tensor, floor: torch.Tensor, what: str) -> torch.Tensor:
    degenerate = denominator.abs() <= floor
    if degenerate.any():
        warnings.warn(
            f"EquiNorm: {what} is (near) zero for output channel(s) "
            f"{degenerate.nonzero().flatten().tolist()}: the channel's weights all share one "
            f"sign after the shift, or its inputs are zero or cancel (seed 004 assumes "
            f"non-negative inputs and mixed-sign kernels); using a small denominator instead",
            RuntimeWarning, stacklevel=2)
    # Positive: the sign of a (near) zero sum is often rounding noise (a row of one
    # sign cancels exactly against its shift), and must not flip the output.
    fallback = floor
    # A zero floor means zero inputs or zero weights: the numerator is zero too.
    fallback = torch.where(fallback == 0, torch.ones_like(fallback), fallback)
    return torch.where(degenerate, fallback, denominator)


def balance_signs_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Resample the signs of each output channel whose weights all share one sign, in place.

    Seed 004 section 5.2: the denominator of s vanishes when a channel's weights
    are all positive (or all negative); starting every channel with both signs
    avoids it. Magnitudes are kept.
    """
    rows = weight.detach().view(weight.shape[0], -1)
    if rows.shape[1] < 2:
        raise ValueError(f"EquiNorm needs at least 2 weights per output channel to mix signs; "
                         f"got a weight of shape {tuple(weight.shape)}")
    with torch.no_grad():
        while (one_sign := (rows >= 0).all(1) | (rows <= 0).all(1)).any():
            signs = torch.randint(0, 2, rows[one_sign].shape, generator=generator,
                                  device=rows.device).to(rows.dtype) * 2 - 1
            rows[one_sign] = rows[one_sign].abs() * signs
    return weight


class _EquiNorm(nn.Module, Syncable):
    """What EquiNormLinear and EquiNormConv2d share: parameters, statistics, forward.

    A subclass sets the weight shape and says how its input is read
    (`_check_input`, `_positions_ratio`, `_stat_dims`) and which map applies the
    weight (`_apply_weight`).
    """

    def __init__(self, in_channels: int, out_channels: int, weight_shape: tuple[int, ...],
                 groups: int, bias: bool, single_pass: bool, stat_fraction: float,
                 momentum: float, sync: bool, process_group, device=None, dtype=None):
        super().__init__()
        self._init_sync(sync, process_group)
        factory = {"device": device, "dtype": dtype}
        if not 0 < stat_fraction <= 1:
            raise ValueError(f"stat_fraction must be in (0, 1], got {stat_fraction!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        if math.prod(weight_shape[1:]) < 2:
            raise ValueError(f"EquiNorm needs at least 2 weights per output channel "
                             f"(in_channels / groups x kernel size >= 2); got weight shape "
                             f"{weight_shape}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.single_pass, self.stat_fraction, self.momentum = single_pass, stat_fraction, momentum
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.gain = nn.Parameter(torch.empty(out_channels, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.register_buffer("running_mean", torch.empty(in_channels, **factory))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        # Ones: every input channel weighs alike until statistics arrive.
        nn.init.ones_(self.running_mean)

    def reset_parameters(self) -> None:
        """torch's default weight init with mixed signs per channel; gain 1, bias 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        balance_signs_(self.weight)
        nn.init.ones_(self.gain)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training:
            # At least float32: under autocast the input may be bfloat16.
            dtype = torch.promote_types(x.dtype, torch.float32)
            group = self.sync_group() if self.sync else None
            if group is None:
                stat_samples = max(1, round(self.stat_fraction * x.shape[0]))
                input_mean = x[:stat_samples].mean(self._stat_dims(x), dtype=dtype)
            else:
                input_mean = self._global_input_mean(x, dtype, group)
            with torch.no_grad():
                self.running_mean.lerp_(input_mean.to(self.running_mean.dtype), self.momentum)
        else:
            input_mean = self.running_mean
        shift, scale, row_max = unit_row_shift_scale(
            self.weight, input_mean, self._positions_ratio(x), self.groups, self.single_pass)
        # The gain folds into the weight: the affine costs nothing per activation.
        per_channel = (-1,) + (1,) * (self.weight.dim() - 1)
        unit_rows = self.weight / row_max.view(per_channel)  # s = s^ / m can overflow
        weight = (self.gain * scale).view(per_channel) * (unit_rows + shift.view(per_channel))
        return self._apply_weight(x, weight)

    def _global_input_mean(self, x: torch.Tensor, dtype: torch.dtype, group) -> torch.Tensor:
        """m over the first `stat_fraction` of the group's global batch (ranks in order),
        differentiable through the all-reduce."""
        stat_rows = x.shape[0]
        if self.stat_fraction < 1:  # where this rank's rows sit in the global batch
            ranks = RankSlice.of(x.shape[0], group, x.device)
            stat_samples = max(1, round(self.stat_fraction * ranks.total))
            stat_rows = min(max(stat_samples - ranks.start, 0), x.shape[0])
        part = x[:stat_rows]
        count = part.new_full((1,), part.numel() // self.in_channels, dtype=dtype)
        sums = all_reduce_sum(torch.cat([part.sum(self._stat_dims(x), dtype=dtype), count]),
                              group)
        return sums[:-1] / sums[-1]

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: expected a floating-point input, "
                            f"got dtype {x.dtype}")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{type(self).__name__}: input dtype {x.dtype} does not match the "
                            f"weight dtype {self.weight.dtype} (convert one, or use autocast)")

    def _copy_function_of(self, module: nn.Module):
        """Take `module`'s weight and bias and set gain = 1 / s at the running means (ones).

        EquiNorm's effective kernel always has zero (input-weighted) mean per
        output channel, so no gain or bias reproduces an arbitrary layer on all
        inputs. With running means of one, b_d is minus the mean of channel d's
        kernel, and in evaluation mode the layer computes `module`'s function
        with each output channel's kernel mean removed: exactly `module`'s
        function when those means are zero. For a convolution, exactly means
        at inputs whose size the output covers (H_out stride = H, as with
        padding k // 2). In training mode s comes from each batch, as in any
        batch normalizer.
        """
        with torch.no_grad():
            self.weight.copy_(module.weight)
            if self.bias is not None:
                self.bias.copy_(module.bias)
            self.reset_running_stats()
            _, scale, row_max = unit_row_shift_scale(self.weight, self.running_mean, 1.0,
                                                     self.groups, self.single_pass)
            self.gain.copy_(row_max / scale)  # 1 / s, finite for tiny rows too
        return self.train(module.training)

    def _extra_repr_tail(self) -> str:
        return (f"bias={self.bias is not None}, single_pass={self.single_pass}, "
                f"stat_fraction={self.stat_fraction}, momentum={self.momentum}"
                + self._sync_repr())


class EquiNormLinear(_EquiNorm):
    r"""A Linear layer with Equilibrium Normalization of its weights (seed 004).

    The 1x1, single-position case of :class:`EquiNormConv2d`: with m_c the
    mean of input feature c over the batch (or its first `stat_fraction`)::

        b_d  = -sum_c m_c W_dc / sum_c m_c
        s_d  = 1 / sum_c m_c W'_dc,   W'_dc = (W_dc + b_d) [W_dc + b_d > 0]  (two-pass)
                                        or  W_dc [W_dc > 0] + b_d [W_dc > 0]  (single-pass)
        y    = gain * (s (W + b)) x + bias

    so that over the batch each output has mean zero and its positive weights
    contribute one per sample. Evaluation mode uses ``running_mean`` (updated
    with `momentum` in training) instead of the batch's m.

    Args:
        in_features, out_features, bias: as for :class:`torch.nn.Linear`.
        single_pass: the paper's one-pass approximation (default, as in its experiments).
        stat_fraction: the fraction of the batch (from its start) that gives m, in (0, 1].
        momentum: running_mean <- (1 - momentum) running_mean + momentum m.
        sync: under DistributedDataParallel, m over the global batch of
            `process_group` (None: the world group), its first `stat_fraction`
            taken in rank order; see `normlab.convert_sync`. Default: False,
            m of the batch this process is given.

    Shape:
        - Input: (N, *, in_features), at least 2-D (a batch).
        - Output: (N, *, out_features).

    Example:
        >>> layer = EquiNormLinear(20, 30)
        >>> layer(torch.rand(128, 20)).shape
        torch.Size([128, 30])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 single_pass: bool = True, stat_fraction: float = 1.0, momentum: float = 0.1,
                 sync: bool = False, process_group=None, device=None, dtype=None):
        super().__init__(in_features, out_features, (out_features, in_features), 1, bias,
                         single_pass, stat_fraction, momentum, sync, process_group, device,
                         dtype)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_module(cls, module: nn.Linear, **kw) -> EquiNormLinear:
        """An EquiNormLinear computing `module`'s function, in the sense of `_copy_function_of`."""
        layer = cls(module.in_features, module.out_features, module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype, **kw)
        return layer._copy_function_of(module)

    def _check_input(self, x):
        super()._check_input(x)
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"EquiNormLinear: expected input (N, *, {self.in_features}), "
                             f"got {tuple(x.shape)}")

    def _stat_dims(self, x):
        return tuple(range(x.dim() - 1))

    def _positions_ratio(self, x):
        return 1.0

    def _apply_weight(self, x, weight):
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                + self._extra_repr_tail())


class EquiNormConv2d(_EquiNorm):
    r"""A Conv2d layer with Equilibrium Normalization of its weights (seed 004, section 4).

    For output channel d, with m_c the mean of input channel c over the batch
    (or its first `stat_fraction`) and positions, w_dc = sum_jk w_dcjk and
    K = kh kw::

        r    = batch x H_out x W_out x stride^2   (per input element: r / (batch H W))
        b_d  = -sum_c m_c w_dc / (K sum_c m_c)
        w'_dc = sum_jk (w_dcjk + b_d) [w_dcjk + b_d > 0]                (two-pass)
              = sum_jk w_dcjk [w_dcjk > 0] + b_d #{jk: w_dcjk > 0}       (single-pass)
        s_d  = r / sum_c v_c w'_dc,   v_c = batch H W m_c
        y    = gain * conv(x, s (w + b)) + bias

    With circular padding and stride 1 (and two-pass), each output channel has
    mean zero over batch and positions and its positive weights contribute r
    in total; s and b are differentiated through (autograd). Evaluation mode
    uses ``running_mean`` (updated with `momentum` in training) instead of m.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        bias, padding_mode: as for :class:`torch.nn.Conv2d` (padding as int or pair).
        single_pass: the paper's one-pass approximation (default, as in its experiments).
        stat_fraction: the fraction of the batch (from its start) that gives m, in (0, 1].
        momentum: running_mean <- (1 - momentum) running_mean + momentum m.
        sync: under DistributedDataParallel, m over the global batch of
            `process_group` (None: the world group), its first `stat_fraction`
            taken in rank order; see `normlab.convert_sync`. Default: False,
            m of the batch this process is given.

    Shape:
        - Input: (N, C_in, H, W).
        - Output: (N, C_out, H_out, W_out), as for :class:`torch.nn.Conv2d`.

    Example:
        >>> layer = EquiNormConv2d(16, 32, 3, padding=1)
        >>> layer(torch.rand(8, 16, 32, 32)).shape
        torch.Size([8, 32, 32, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 single_pass: bool = True, stat_fraction: float = 1.0, momentum: float = 0.1,
                 sync: bool = False, process_group=None, device=None, dtype=None):
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must divide in_channels ({in_channels}) and out_channels "
                             f"({out_channels}); got groups={groups}")
        if isinstance(padding, str):
            raise ValueError(f"EquiNormConv2d: padding must be an int or a pair of ints, "
                             f"got {padding!r}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or "
                             f"'circular', got {padding_mode!r}")
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.padding_mode = padding_mode
        super().__init__(in_channels, out_channels,
                         (out_channels, in_channels // groups, *self.kernel_size), groups, bias,
                         single_pass, stat_fraction, momentum, sync, process_group, device,
                         dtype)

    @classmethod
    def from_module(cls, module: nn.Conv2d, **kw) -> EquiNormConv2d:
        """An EquiNormConv2d computing `module`'s function, in the sense of `_copy_function_of`."""
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, module.bias is not None,
                    module.padding_mode, device=module.weight.device,
                    dtype=module.weight.dtype, **kw)
        return layer._copy_function_of(module)

    def _check_input(self, x):
        super()._check_input(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"EquiNormConv2d: expected input (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")

    def _stat_dims(self, x):
        return (0, 2, 3)

    def _positions_ratio(self, x):
        ratio = 1.0
        for size, kernel, stride, padding, dilation in zip(
                x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation):
            out_size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
            ratio *= out_size * stride / size
        return ratio

    def _apply_weight(self, x, weight):
        if self.padding_mode == "zeros":
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        (ph, pw) = self.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
        return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, padding_mode={self.padding_mode!r}, "
                + self._extra_repr_tail())

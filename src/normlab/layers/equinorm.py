"""Equilibrium Normalization (EquiNorm): drop-in Linear and Conv1d/2d/3d layers.

Defazio and Bottou, "Controlling covariate shift using equilibrium
normalization of weights", arXiv:1812.04549 (ICLR 2019 submission).

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

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks, functional
from ..distributed import RankSlice, Syncable, all_reduce_sum
from ..functional.aten_helpers import in_dtype
from ._base import SPATIAL_NAMES, ConvGeometry, SourceWeight, WeightNormalizedLayer


def balance_signs_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Resample the signs of each output channel whose weights all share one sign, in place.

    The paper's section 5.2: the denominator of s vanishes when a channel's
    weights are all positive (or all negative); starting every channel with
    both signs avoids it. Magnitudes are kept. A meta tensor has no values:
    it is left alone (``reset_parameters`` after ``to_empty`` balances it).
    """
    if weight.is_meta:
        return weight
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


class _EquiNorm(nn.Module, WeightNormalizedLayer, Syncable):
    """What EquiNormLinear and EquiNormConv1d/2d/3d share: parameters, statistics, forward.

    A subclass sets the weight shape and says how its input is read
    (`_check_input`, `_positions_ratio_at` its spatial size, `_stat_dims`)
    and which map applies the weight (`_apply_weight`).
    """

    # its kernels have zero mean per output channel: exact only for such modules
    # (`_load_source`)
    from_module_keeps_function = False

    def __init__(self, in_channels: int, out_channels: int, weight_shape: tuple[int, ...],
                 groups: int, bias: bool, single_pass: bool, stat_fraction: float,
                 momentum: float, sync: bool, process_group, device=None, dtype=None):
        super().__init__()
        self._init_sync(sync, process_group)
        factory = {"device": device, "dtype": dtype}
        owner = type(self).__name__
        checks.in_interval(owner, "stat_fraction", stat_fraction, "(0, 1]")
        checks.in_interval(owner, "momentum", momentum, "[0, 1]")
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
                # A sum, then a division: sum's gradient is a broadcast view, added in
                # place to the convolution's, where mean's and a slice's are tensors of
                # x's size (about 3 more passes over the activations in backward).
                part = x if stat_samples == x.shape[0] else x[:stat_samples]
                input_mean = part.sum(self._stat_dims(x), dtype=dtype) / (
                    part.numel() // self.in_channels)
            else:
                input_mean = self._global_input_mean(x, dtype, group)
            with torch.no_grad():
                self.running_mean.lerp_(in_dtype(input_mean, self.running_mean.dtype),
                                        self.momentum)
        else:
            input_mean = self.running_mean
        # The gain folds into the weight: the affine costs nothing per activation.
        weight = functional.equi_norm(self.weight, input_mean, self.gain,
                                      self._positions_ratio_at(tuple(x.shape[2:])), self.groups,
                                      self.single_pass)
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
        checks.floating_point_input(type(self).__name__, x)
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{type(self).__name__}: input dtype {x.dtype} does not match the "
                            f"weight dtype {self.weight.dtype} (convert one, or use autocast)")

    def _load_source(self, source: SourceWeight) -> None:
        """Take the torch layer's weight and bias and set gain = 1 / s at the running means
        (ones).

        EquiNorm's effective kernel always has zero (input-weighted) mean per
        output channel, so no gain or bias reproduces an arbitrary layer on all
        inputs. With running means of one, b_d is minus the mean of channel d's
        kernel, and in evaluation mode the layer computes the source's function
        with each output channel's kernel mean removed: exactly the source's
        function when those means are zero. For a convolution, exactly means
        at inputs whose size the output covers (output size x stride = input size,
        as with padding k // 2). In training mode s comes from each batch, as in any
        batch normalizer.
        """
        self.weight.copy_(source.weight)
        if self.bias is not None:
            self.bias.copy_(source.bias)
        self.reset_running_stats()
        _, scale, row_max = functional.unit_row_shift_scale(
            self.weight, self.running_mean, 1.0, self.groups, self.single_pass)
        self.gain.copy_(row_max / scale)  # 1 / s, finite for tiny rows too

    @torch.no_grad()
    def to_plain(self, input_size: tuple[int, ...] | None = None) -> nn.Module:
        """The torch layer computing this layer's evaluation-mode function (for fold).

        Its kernel is the one the forward applies in evaluation, from
        ``running_mean``. A convolution whose output size is not its input
        size (stride or padding) has a kernel that depends on the input's
        size (through r): pass `input_size` (its positions, e.g. (H, W)), and the
        plain layer is exact at that size only.
        """
        ratio = self._positions_ratio_at(input_size)
        kernel = functional.equi_norm(self.weight, self.running_mean, self.gain, ratio,
                                      self.groups, self.single_pass)
        return self._plain_with(kernel, self.bias)

    def _extra_repr_tail(self) -> str:
        return (f"bias={self.bias is not None}, single_pass={self.single_pass}, "
                f"stat_fraction={self.stat_fraction}, momentum={self.momentum}"
                + self._sync_repr())


class EquiNormLinear(_EquiNorm):
    r"""A Linear layer with Equilibrium Normalization of its weights.

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

    plain_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 single_pass: bool = True, stat_fraction: float = 1.0, momentum: float = 0.1,
                 sync: bool = False, process_group=None, device=None, dtype=None):
        checks.positive_int(type(self).__name__, "in_features", in_features)
        checks.positive_int(type(self).__name__, "out_features", out_features)
        super().__init__(in_features, out_features, (out_features, in_features), 1, bias,
                         single_pass, stat_fraction, momentum, sync, process_group, device,
                         dtype)
        self.in_features, self.out_features = in_features, out_features

    def _check_input(self, x):
        super()._check_input(x)
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"EquiNormLinear: expected input (N, *, {self.in_features}), "
                             f"got {tuple(x.shape)}")

    def _stat_dims(self, x):
        return tuple(range(x.dim() - 1))

    def _positions_ratio_at(self, input_size):
        return 1.0

    def _apply_weight(self, x, weight):
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                + self._extra_repr_tail())


class _EquiNormConv(ConvGeometry, _EquiNorm):
    r"""A convolution with Equilibrium Normalization of its weights.

    For output channel d, with m_c the mean of input channel c over the batch
    (or its first `stat_fraction`) and positions, w_dc = sum_j w_dcj over the K
    positions j of the kernel::

        r    = batch x (output positions) x (product of the strides)
               (per input element: r / (batch x input positions))
        b_d  = -sum_c m_c w_dc / (K sum_c m_c)
        w'_dc = sum_j (w_dcj + b_d) [w_dcj + b_d > 0]                (two-pass)
              = sum_j w_dcj [w_dcj > 0] + b_d #{j: w_dcj > 0}       (single-pass)
        s_d  = r / sum_c v_c w'_dc,   v_c = batch x (input positions) x m_c
        y    = gain * conv(x, s (w + b)) + bias

    (the paper's Conv2d, where the positions are H x W and the strides' product
    stride^2, in any number of spatial dims). With circular padding and stride 1
    (and two-pass), each output channel has mean zero over batch and positions and
    its positive weights contribute r in total; s and b are differentiated through
    (autograd). Evaluation mode uses ``running_mean`` (updated with `momentum` in
    training) instead of m.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        bias, padding_mode: as the torch convolution (padding as int or tuple).
        single_pass: the paper's one-pass approximation (default, as in its experiments).
        stat_fraction: the fraction of the batch (from its start) that gives m, in (0, 1].
        momentum: running_mean <- (1 - momentum) running_mean + momentum m.
        sync: under DistributedDataParallel, m over the global batch of
            `process_group` (None: the world group), its first `stat_fraction`
            taken in rank order; see `normlab.convert_sync`. Default: False,
            m of the batch this process is given.

    Shape:
        - Input: (N, C_in, *positions), batched.
        - Output: (N, C_out, *positions_out), as the torch convolution.

    Example:
        >>> layer = EquiNormConv2d(16, 32, 3, padding=1)
        >>> layer(torch.rand(8, 16, 32, 32)).shape
        torch.Size([8, 32, 32, 32])
    """

    plain_form_needs_input_size = True  # with stride or padding, see to_plain

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 single_pass: bool = True, stat_fraction: float = 1.0, momentum: float = 0.1,
                 sync: bool = False, process_group=None, device=None, dtype=None):
        weight_shape = self._init_geometry(in_channels, out_channels, kernel_size, stride,
                                           padding, dilation, groups, padding_mode)
        super().__init__(in_channels, out_channels, weight_shape, groups, bias, single_pass,
                         stat_fraction, momentum, sync, process_group, device, dtype)

    def _check_input(self, x):
        super()._check_input(x)
        self._check_conv_input(x)

    def _stat_dims(self, x):
        return (0, *range(2, x.dim()))

    def _positions_ratio_at(self, input_size):
        if input_size is None:
            if all(s == 1 for s in self.stride) and all(2 * p == d * (k - 1) for k, p, d in zip(
                    self.kernel_size, self.padding, self.dilation)):
                return 1.0  # output size = input size, whatever the size
            raise ValueError(
                f"{type(self).__name__}: with stride {self.stride} and padding {self.padding} "
                f"the evaluation kernel depends on the input size; pass "
                f"input_size=({SPATIAL_NAMES[self.spatial_dims()]}) "
                f"(normlab.fold(model, example_input) does)")
        ratio = 1.0
        for size, kernel, stride, padding, dilation in zip(
                input_size, self.kernel_size, self.stride, self.padding, self.dilation):
            out_size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
            ratio *= out_size * stride / size
        return ratio

    def _apply_weight(self, x, weight):
        return self._conv(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, {self._extra_repr_tail()}"


class EquiNormConv1d(_EquiNormConv):
    __doc__ = _EquiNormConv.__doc__.replace("A convolution", "A Conv1d layer", 1)
    plain_type = nn.Conv1d


class EquiNormConv2d(_EquiNormConv):
    __doc__ = _EquiNormConv.__doc__.replace("A convolution", "A Conv2d layer", 1)
    plain_type = nn.Conv2d


class EquiNormConv3d(_EquiNormConv):
    __doc__ = _EquiNormConv.__doc__.replace("A convolution", "A Conv3d layer", 1)
    plain_type = nn.Conv3d

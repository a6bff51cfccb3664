"""Batch Renormalization (Ioffe 2017): batch norm corrected towards its running statistics."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import checks, functional
from ._base import ChannelNorm


class _BatchRenorm(ChannelNorm, _BatchNorm):
    # A _BatchNorm for the tools that select BatchNorm layers by isinstance
    # (torch.optim.swa_utils.update_bn, freezing helpers), with BatchNorm's attributes,
    # buffers and state-dict loading (_NormBase's: a checkpoint without num_batches_tracked
    # loads); its forward, input checks and bfloat16 buffer rule are ChannelNorm's and this
    # class's.
    statistics_over = "batch"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 r_max: float = 3.0, d_max: float = 5.0, affine: bool = True,
                 track_running_stats: bool = True, *, sync: bool = False, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, affine, sync, process_group, device, dtype,
                         track_running_stats)
        checks.in_interval(type(self).__name__, "eps", eps, "(0, inf)")
        if momentum is not None:
            checks.in_interval(type(self).__name__, "momentum", momentum, "[0, 1]")
        self.eps, self.momentum = eps, momentum
        self.r_max, self.d_max = r_max, d_max  # plain attributes: training loops ramp them
        self._check_limits()
        if track_running_stats:
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats:
            self.num_batches_tracked.zero_()

    def _check_limits(self) -> None:
        checks.in_interval(type(self).__name__, "r_max", self.r_max, "[1, inf)")
        checks.in_interval(type(self).__name__, "d_max", self.d_max, "[0, inf)")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"r_max={self.r_max}, d_max={self.d_max}, affine={self.affine}"
                + ("" if self.track_running_stats else ", track_running_stats=False")
                + self._sync_repr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        updates_statistics = self.training and self.track_running_stats
        if updates_statistics:
            self._check_limits()
        group = self.sync_group() if self.training else None
        batch_statistics = self.training or not self.track_running_stats
        if batch_statistics and group is None and x.numel() // x.shape[1] < 2:
            raise ValueError(f"{type(self).__name__} needs more than 1 value per channel "
                             f"with batch statistics, got shape {tuple(x.shape)}")
        momentum = self.momentum
        if updates_statistics:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as in torch's BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        out, running_mean, running_var = functional.batch_renorm(
            x, self.running_mean, self.running_var, self.weight, self.bias, batch_statistics,
            momentum or 0.0, self.eps, self.r_max, self.d_max, process_group=group)
        if updates_statistics:  # new tensors rather than in-place updates: see batch_renorm
            # into _buffers directly (they are registered): Module.__setattr__'s checks took
            # ~10 us, an eighth of the whole step at (32, 512) on the compiled path
            self._buffers.update(running_mean=running_mean, running_var=running_var)
        return out


class BatchRenorm1d(_BatchRenorm):
    r"""Batch Renormalization over (N, C) or (N, C, L) inputs (Ioffe 2017).

    In training, with mu_B, var_B the batch statistics of a channel,
    sigma_B = sqrt(var_B + eps) and sigma = sqrt(running_var + eps):

    .. math::
        r = \mathrm{clip}(\sigma_B / \sigma, 1 / r_{max}, r_{max}), \quad
        d = \mathrm{clip}((\mu_B - \mu) / \sigma, -d_{max}, d_{max}) \\
        y = \mathrm{weight} \cdot ((x - \mu_B) / \sigma_B \cdot r + d) + \mathrm{bias}

    with r and d constants in the backward pass, then the running statistics
    move towards the batch ones by `momentum` (the variance unbiased, as in
    torch's BatchNorm). Evaluation uses the running statistics. ``r_max = 1``
    and ``d_max = 0`` give batch normalization; `r_max` and `d_max` are plain
    attributes so a training loop can ramp them, as the paper does.

    It keeps torch BatchNorm's contract: it is a
    ``torch.nn.modules.batchnorm._BatchNorm`` (so ``torch.optim.swa_utils.update_bn``
    recomputes its statistics), counts its training steps in ``num_batches_tracked``,
    and loads a torch ``BatchNorm1d/2d/3d`` state dict strictly (the same keys), so a
    pretrained BatchNorm layer becomes a Batch Renormalization one with its statistics.
    torch's ``SyncBatchNorm.convert_sync_batchnorm`` would make it a plain BatchNorm: use
    `normlab.convert_sync`.

    Args:
        num_features: C.
        eps: added to the variances. Default: 1e-5.
        momentum: the running statistics' update rate, or None for their cumulative
            average over the batches since the last reset (the factor
            1 / num_batches_tracked), as in torch's BatchNorm. Default: 0.01.
        r_max, d_max: the clipping limits. Defaults: 3.0, 5.0.
        affine: learnable per-channel ``weight`` and ``bias``. Default: True.
        track_running_stats: keep running statistics. False: none are kept (the
            buffers ``running_mean``, ``running_var`` and ``num_batches_tracked`` are
            None) and the batch statistics are used in training and evaluation alike,
            with r = 1 and d = 0: plain batch normalization, as torch's BatchNorm with
            ``track_running_stats=False``. Default: True.
        device, dtype: of the parameters; the running statistics are kept in
            at least float32.
        sync: under DistributedDataParallel, take the batch statistics over the
            global batch of `process_group` (None: the world group), as
            :class:`torch.nn.SyncBatchNorm` does; see `normlab.convert_sync`.
            Default: False, the statistics of the batch this process is given.

    Shape:
        - Input: (N, C) or (N, C, L)
        - Output: same shape as the input

    Example:
        >>> norm = BatchRenorm1d(64, r_max=1.0, d_max=0.0)  # start as batch norm
        >>> out = norm(torch.randn(16, 64))
        >>> norm.r_max, norm.d_max = 3.0, 5.0  # relax later in training
    """

    _input_dims = (2, 3)
    dim = 1


class BatchRenorm2d(_BatchRenorm):
    r"""Batch Renormalization over (N, C, H, W) inputs (Ioffe 2017).

    The math of :class:`BatchRenorm1d`, with the statistics over N, H and W.

    Args:
        num_features: C.
        eps, momentum, r_max, d_max, affine, track_running_stats, sync, device, dtype: as
            :class:`BatchRenorm1d`.

    Shape:
        - Input: (N, C, H, W)
        - Output: (N, C, H, W)

    Example:
        >>> norm = BatchRenorm2d(64)
        >>> out = norm(torch.randn(8, 64, 32, 32))
    """

    _input_dims = (4,)
    dim = 2


class BatchRenorm3d(_BatchRenorm):
    r"""Batch Renormalization over (N, C, D, H, W) inputs (Ioffe 2017).

    The math of :class:`BatchRenorm1d`, with the statistics over N, D, H and W.

    Args:
        num_features: C.
        eps, momentum, r_max, d_max, affine, track_running_stats, sync, device, dtype: as
            :class:`BatchRenorm1d`.

    Shape:
        - Input: (N, C, D, H, W)
        - Output: (N, C, D, H, W)

    Example:
        >>> norm = BatchRenorm3d(16)
        >>> out = norm(torch.randn(2, 16, 4, 8, 8))
    """

    _input_dims = (5,)
    dim = 3

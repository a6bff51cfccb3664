"""Batch Renormalization (Ioffe 2017): batch norm corrected towards its running statistics."""

from __future__ import annotations

import torch

from .. import checks, functional
from ._base import ChannelNorm


class _BatchRenorm(ChannelNorm):
    statistics_over = "batch"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01,
                 r_max: float = 3.0, d_max: float = 5.0, affine: bool = True, *,
                 sync: bool = False, process_group=None, device=None, dtype=None):
        super().__init__(num_features, affine, sync, process_group, device, dtype)
        checks.in_interval(type(self).__name__, "eps", eps, "(0, inf)")
        checks.in_interval(type(self).__name__, "momentum", momentum, "[0, 1]")
        self.eps, self.momentum = eps, momentum
        self.r_max, self.d_max = r_max, d_max  # plain attributes: training loops ramp them
        self._check_limits()
        self.reset_parameters()

    def _check_limits(self) -> None:
        checks.in_interval(type(self).__name__, "r_max", self.r_max, "[1, inf)")
        checks.in_interval(type(self).__name__, "d_max", self.d_max, "[0, inf)")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"r_max={self.r_max}, d_max={self.d_max}, affine={self.affine}"
                + self._sync_repr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training:
            self._check_limits()
        group = self.sync_group() if self.training else None
        if self.training and group is None and x.numel() // x.shape[1] < 2:
            raise ValueError(f"{type(self).__name__} needs more than 1 value per channel in "
                             f"training, got shape {tuple(x.shape)}")
        out, running_mean, running_var = functional.batch_renorm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps, self.r_max, self.d_max, process_group=group)
        if self.training:  # new tensors rather than in-place updates: see batch_renorm
            self.running_mean, self.running_var = running_mean, running_var
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

    Args:
        num_features: C.
        eps: added to the variances. Default: 1e-5.
        momentum: the running statistics' update rate. Default: 0.01.
        r_max, d_max: the clipping limits. Defaults: 3.0, 5.0.
        affine: learnable per-channel ``weight`` and ``bias``. Default: True.
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
        eps, momentum, r_max, d_max, affine, device, dtype: as
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
        eps, momentum, r_max, d_max, affine, sync, device, dtype: as :class:`BatchRenorm1d`.

    Shape:
        - Input: (N, C, D, H, W)
        - Output: (N, C, D, H, W)

    Example:
        >>> norm = BatchRenorm3d(16)
        >>> out = norm(torch.randn(2, 16, 4, 8, 8))
    """

    _input_dims = (5,)
    dim = 3

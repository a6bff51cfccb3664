"""Batch Renormalization (Ioffe 2017): batch norm corrected towards its running statistics."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import global_batch_norm
from .channel_norm import ChannelNorm


class _BatchRenorm(ChannelNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01,
                 r_max: float = 3.0, d_max: float = 5.0, affine: bool = True, *,
                 sync: bool = False, process_group=None):
        super().__init__(num_features, affine, sync, process_group)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.eps, self.momentum = eps, momentum
        self.r_max, self.d_max = r_max, d_max  # plain attributes: training loops ramp them
        self._check_limits()
        self.reset_parameters()

    def _check_limits(self) -> None:
        if self.r_max < 1 or self.d_max < 0:
            raise ValueError(f"r_max must be >= 1 and d_max >= 0, got r_max={self.r_max}, "
                             f"d_max={self.d_max}")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"r_max={self.r_max}, d_max={self.d_max}, affine={self.affine}"
                + self._sync_repr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # Low-precision inputs are normalized in float32; the statistics stay float32.
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        view = (1, -1) + (1,) * (x.dim() - 2)
        # A layer moved to bfloat16 computes in float32 too: its state is cast (to()
        # returns the buffer itself when the dtype already matches) and written back.
        running_mean, running_var = (s.to(work.dtype) for s in (self.running_mean,
                                                                self.running_var))
        weight = torch.ones_like(running_mean) if self.weight is None else \
            self.weight.to(work.dtype)
        bias = torch.zeros_like(running_mean) if self.bias is None else self.bias.to(work.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if not self.training:
                return nn.functional.batch_norm(work, running_mean, running_var,
                                                weight, bias, False, 0.0, self.eps).to(x.dtype)
            self._check_limits()
            sigma = (running_var + self.eps).sqrt()
            mean_before = running_mean.clone()
            # torch's batch-norm kernel: x^ with the batch statistics, which it returns
            # without gradient (r and d are constants of the backward pass, as in the
            # paper), and the running statistics updated with `momentum`.
            group = self.sync_group() if self.sync else None
            if group is None:
                if x.numel() // x.shape[1] < 2:
                    raise ValueError(f"{type(self).__name__} needs more than 1 value per channel "
                                     f"in training, got shape {tuple(x.shape)}")
                x_hat, batch_mean, batch_inv_std = torch.native_batch_norm(
                    work, None, None, running_mean, running_var, True, self.momentum, self.eps)
            else:  # the same, over the global batch of the process group
                x_hat, batch_mean, batch_inv_std = global_batch_norm(
                    work, running_mean, running_var, self.momentum, self.eps, group)
            r = (1 / (batch_inv_std * sigma)).clamp(1 / self.r_max, self.r_max)
            d = ((batch_mean - mean_before) / sigma).clamp(-self.d_max, self.d_max)
            out = torch.addcmul((d * weight + bias).view(view), x_hat, (r * weight).view(view))
        if running_mean is not self.running_mean:
            with torch.no_grad():
                self.running_mean.copy_(running_mean)
                self.running_var.copy_(running_var)
        return out.to(x.dtype)


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


class BatchRenorm2d(_BatchRenorm):
    r"""Batch Renormalization over (N, C, H, W) inputs (Ioffe 2017).

    The math of :class:`BatchRenorm1d`, with the statistics over N, H and W.

    Shape:
        - Input: (N, C, H, W)
        - Output: (N, C, H, W)

    Example:
        >>> norm = BatchRenorm2d(64)
        >>> out = norm(torch.randn(8, 64, 32, 32))
    """

    _input_dims = (4,)

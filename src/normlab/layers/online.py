"""Online Normalization (Chiley et al. 2019): normalization without batches.

Every channel sees the samples as one stream, in order. The forward pass
normalizes each sample with running statistics computed from the samples
*before* it; the backward pass runs a control process that removes, from the
gradient, its projections on 1 and on the output, the two conditions the true
normalization gradient satisfies. Both processes are linear recurrences over
the samples, so a whole batch is computed at once with prefix scans.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checks, functional
from ._base import AffineForm, ChannelNorm, running_stats_affine


class _OnlineNorm(ChannelNorm):
    def __init__(self, num_features: int, alpha_fwd: float = 0.999, alpha_bkw: float = 0.99,
                 eps: float = 1e-5, affine: bool = True, ecm: str | None = "ac",
                 ls_eps: float = 1e-5, clamp_val: float = 5.0, *, sync: bool = False,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, affine, sync, process_group, device, dtype)
        owner = type(self).__name__
        checks.in_interval(owner, "alpha_fwd", alpha_fwd, "(0, 1)")
        checks.in_interval(owner, "alpha_bkw", alpha_bkw, "(0, 1)")
        checks.one_of(owner, "ecm", ecm, functional.ONLINE_NORM_ECMS)
        for name, value in (("eps", eps), ("ls_eps", ls_eps), ("clamp_val", clamp_val)):
            checks.in_interval(owner, name, value, "(0, inf)")
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.eps, self.ecm = eps, ecm
        self.ls_eps, self.clamp_val = ls_eps, clamp_val
        self._statistics_buffer("mean_control", device, dtype)  # u
        self._statistics_buffer("correlation_control", device, dtype)  # v
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.mean_control.zero_()
        self.correlation_control.zero_()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"eps={self.eps}, affine={self.affine}, ecm={self.ecm!r}, "
                f"ls_eps={self.ls_eps}, clamp_val={self.clamp_val}" + self._sync_repr())

    def eval_affine_form(self) -> AffineForm | None:
        if self.ecm == "ls":  # divides each sample by its own second moment: not affine
            return None
        form = running_stats_affine(self)
        if self.ecm == "ac":  # the clamp stays, after the layer the affine map folds into
            form.after = nn.Hardtanh(-self.clamp_val, self.clamp_val)
        return form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return functional.online_norm(
            x, self.running_mean, self.running_var, self.mean_control, self.correlation_control,
            self.weight, self.bias, self.training, self.alpha_fwd, self.alpha_bkw, self.eps,
            self.ecm, self.ls_eps, self.clamp_val,
            process_group=self.sync_group() if self.training else None)


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
        device, dtype: of the parameters; the buffers are kept in at least
            float32.
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
    dim = 1


class OnlineNorm2d(_OnlineNorm):
    r"""Online Normalization over (N, C, H, W) inputs (Chiley et al. 2019).

    The math of :class:`OnlineNorm1d`, with m_t and s2_t the mean and biased
    variance of sample t over the H * W positions and the backward means taken
    over the same positions.

    Args:
        num_features: C.
        alpha_fwd, alpha_bkw, eps, affine, ecm, ls_eps, clamp_val, device, dtype:
            as :class:`OnlineNorm1d`.

    Shape:
        - Input: (N, C, H, W)
        - Output: (N, C, H, W)

    Example:
        >>> norm = OnlineNorm2d(64, ecm="ls")
        >>> out = norm(torch.randn(8, 64, 32, 32))
    """

    _input_dims = (4,)
    dim = 2


class OnlineNorm3d(_OnlineNorm):
    r"""Online Normalization over (N, C, D, H, W) inputs (Chiley et al. 2019), as in the
    3-D U-Nets the paper trains at batch size 1.

    The math of :class:`OnlineNorm1d`, with m_t and s2_t the mean and biased
    variance of sample t over the D * H * W positions and the backward means taken
    over the same positions.

    Args:
        num_features: C.
        alpha_fwd, alpha_bkw, eps, affine, ecm, ls_eps, clamp_val, sync, device, dtype:
            as :class:`OnlineNorm1d`.

    Shape:
        - Input: (N, C, D, H, W)
        - Output: (N, C, D, H, W)

    Example:
        >>> norm = OnlineNorm3d(16)
        >>> out = norm(torch.randn(1, 16, 8, 32, 32))  # one volume at a time
    """

    _input_dims = (5,)
    dim = 3

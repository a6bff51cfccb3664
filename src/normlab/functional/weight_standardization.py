"""Weight Standardization (Qiao et al. 2019, arXiv:1903.10520)."""

from __future__ import annotations

import torch


def standardized_weight(weight: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Each output channel's weights (dim 0; the rest is its fan-in) less their mean, over
    their standard deviation floored at `eps` (the paper's eq. 2):

    .. math::
        \hat W_{i,j} = (W_{i,j} - \mu_i) / \max(\sigma_i, \epsilon), \quad
        \mu_i = \mathrm{mean}_j W_{i,j}, \quad
        \sigma_i^2 = \mathrm{mean}_j (W_{i,j} - \mu_i)^2

    The paper guards the division with sqrt(sigma^2 + eps); a floor does the same and keeps
    each row's scale out of the result wherever sigma > eps. A row with sigma below the floor
    (a constant one: fan-in 1, or all weights equal) standardizes to ~0, with finite gradients.
    Low-precision weights are standardized in float32.
    """
    # low-precision weights are standardized in float32, then rounded once
    rows = weight.flatten(1)
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    mean = rows.mean(1, keepdim=True)
    variance = rows.var(1, correction=0, keepdim=True)
    # the floor on the variance, not the std: the square root's gradient at 0 is infinite
    standardized = (rows - mean) * variance.clamp_min(eps * eps).rsqrt()
    return standardized.view_as(weight).to(weight.dtype)

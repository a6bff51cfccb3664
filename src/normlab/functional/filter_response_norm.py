"""Filter Response Normalization with a Thresholded Linear Unit (Singh and Krishnan 2020,
arXiv:1911.09737)."""

from __future__ import annotations

import torch


def filter_response_norm(x: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, tau: torch.Tensor | None,
                         eps: float | torch.Tensor) -> torch.Tensor:
    r"""FRN + TLU of (N, C, *) `x`, per sample and channel (the paper's eqs. 1-3):

    .. math::
        \nu^2 = \mathrm{mean}_{positions}(x^2), \quad
        y = \mathrm{weight} \cdot x / \sqrt{\nu^2 + \epsilon} + \mathrm{bias}, \quad
        z = \max(y, \tau)

    with one `weight`, `bias`, `tau` per channel (None: 1, 0, no threshold). An (N, C)
    input has one position: nu^2 = x^2. No statistic crosses the batch. `eps` is a float
    or a 0-d tensor (a learned epsilon). Low-precision inputs are normalized in float32.
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    positions = tuple(range(2, x.dim()))
    squares = work.square()
    nu2 = squares.mean(positions, keepdim=True) if positions else squares
    out = work * torch.rsqrt(nu2 + eps)
    view = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.to(work.dtype).view(view)
    if bias is not None:
        out = out + bias.to(work.dtype).view(view)
    if tau is not None:
        out = torch.maximum(out, tau.to(work.dtype).view(view))
    return out.to(x.dtype)

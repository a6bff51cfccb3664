"""Explicit weight normalization: unit-norm weight rows after every optimizer step.

A weight-normalized layer computes z_i = gain_i (w_i . x) / ||w_i|| + b_i
(Salimans and Kingma 2016, arXiv:1602.07868). Trained as a parametrization,
the gradient of w_i is orthogonal to w_i and proportional to 1 / ||w_i||, so
||w_i|| only grows under SGD and the step taken by the direction
w_i / ||w_i|| shrinks like 1 / ||w_i||^2: the effective learning rate decays
as training goes on.

The explicit normalization that FastNorm (Anonymous 2019, "FastNorm:
improving numerical stability of neural network training with efficient
normalization", ICLR submission, section 3.1) takes as its baseline instead
rescales each row of W to unit norm after every update ("mn operations to
rescale the weight values"), so every step sees ||w_i|| = 1 and the
effective learning rate stays the nominal one. `Renormalize` is that
rescaling, run beside any optimizer like `ENorm`; the network's function is
unchanged by it, only the training dynamics differ.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import row_norms
from ..layers.weight_norm import NORM_EPS, WeightNormBase


class Renormalize:
    r"""Rescales every weight-normalized row to unit norm after each optimizer step.

    .. math:: w_i \leftarrow w_i / \lVert w_i \rVert

    for every output unit of every `WeightNormLinear`/`WeightNormConv1d/2d/3d`
    (and their subclasses: scaled weight normalization, NormProp) in `model`.
    Those layers divide by :math:`\lVert w_i \rVert`, so the function is kept;
    what changes is the next gradient, which no longer shrinks as the norm
    grows. Rows below the layers' norm floor (zero rows) are left alone.

    Args:
        model: the network; its weight-normalized layers are rescaled in place.
        optimizer: the optimizer stepping `model`. Momentum or Adam state would
            hold gradients of the unrescaled weights, so an optimizer that keeps
            per-parameter tensors for these weights is refused at `step` (plain
            SGD keeps none).

    Example:
        >>> model = normlab.convert(nn.Sequential(nn.Linear(784, 10)), "normprop")
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> renorm = normlab.Renormalize(model, optimizer)
        >>> x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> optimizer.step(); renorm.step()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.optimizer = optimizer
        self.layers = [m for m in model.modules()
                       if isinstance(m, WeightNormBase)]
        if not self.layers:
            raise ValueError(f"Renormalize found no weight-normalized layer in "
                             f"{type(model).__name__}: it rescales WeightNormLinear/ConvNd "
                             f"layers (weight_norm, scaled_weight_norm, normprop)")

    def __repr__(self) -> str:
        return f"Renormalize(layers={len(self.layers)})"

    @torch.no_grad()
    def step(self) -> None:
        """Rescale the rows (call it after `optimizer.step()`)."""
        for layer in self.layers:
            self._check_state(layer.weight)
            norms = row_norms(layer.weight, NORM_EPS)
            # a row at the floor is computed with the floor: rescaling it would change z
            norms = torch.where(norms > NORM_EPS, norms, 1.0)
            layer.weight.div_(norms.view(-1, *[1] * (layer.weight.dim() - 1)))

    def _check_state(self, weight: nn.Parameter) -> None:
        state = self.optimizer.state.get(weight, {}) if self.optimizer is not None else {}
        kept = sorted(k for k, v in state.items()
                      if isinstance(v, torch.Tensor) and v.shape == weight.shape)
        if kept:
            raise ValueError(f"Renormalize cannot rescale the state {kept} that "
                             f"{type(self.optimizer).__name__} keeps for the weights; use "
                             f"SGD without momentum")

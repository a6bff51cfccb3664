"""FastNormSGD: the optimizer that FastNorm layers need (their weight's update and tracked
norms), SGD for every other parameter."""

from __future__ import annotations

import math

import torch

from ..layers.fastnorm import layer_of, registrations


class FastNormSGD(torch.optim.SGD):
    """SGD that updates the FastNorm layers among `params` as FastNorm prescribes.

    Plain :class:`torch.optim.SGD` for every other parameter (gains and biases
    included). Each FastNorm weight gets torch SGD's update of its logical
    weight (same learning rate, weight decay and momentum), applied as the
    layer's mode prescribes (see :mod:`normlab.layers.fastnorm`): a rank-B
    update and tracked norms in the fused mode without momentum; a dense
    update and explicit norms in the dense mode or with momentum.

    Args:
        params: as torch.optim.SGD.
        lr, weight_decay, momentum: as torch.optim.SGD (no nesterov, dampening
            or maximize: the FastNorm update is SGD's).

    Example:
        >>> model = normlab.convert(nn.Sequential(nn.Linear(784, 10)), "fastnorm")
        >>> optimizer = FastNormSGD(model.parameters(), lr=0.05, weight_decay=1e-4)
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.0):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"FastNormSGD: {name} must be a finite number, got {value!r}")
        if lr <= 0:
            raise ValueError(f"FastNormSGD: lr must be > 0, got {lr}")
        if weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"FastNormSGD: expected weight_decay >= 0 and 0 <= momentum < 1, "
                             f"got {weight_decay} and {momentum}")
        if lr * weight_decay >= 1:
            raise ValueError(f"FastNormSGD: lr * weight_decay must be < 1 (each step scales "
                             f"the weights by 1 - lr * weight_decay), got {lr * weight_decay}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def add_param_group(self, param_group: dict) -> None:
        unsupported = {k: param_group[k] for k in ("nesterov", "dampening", "maximize")
                       if param_group.get(k)}
        if unsupported:
            raise ValueError(f"FastNormSGD cannot track norms with {unsupported}")
        super().add_param_group(param_group)

    def _fastnorm_layers(self) -> list:
        """(layer, param group, weight) of each FastNorm weight among the parameters.

        Found by `layer_of` per parameter, and kept while the groups are
        (load_state_dict replaces them; add_param_group extends them), no layer
        has registered a weight since, and each layer still holds its weight."""
        groups, cached = self.param_groups, self.__dict__.get("_layers")
        key = (groups, len(groups), registrations())
        if (cached is None or cached[0][0] is not groups or cached[0][1:] != key[1:]
                or any(layer.weight is not weight for layer, _, weight in cached[1])):
            layers = [(layer, group, param) for group in groups for param in group["params"]
                      for layer in [layer_of(param)] if layer is not None]
            cached = self._layers = (key, layers)
        return cached[1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layers = self._fastnorm_layers()
        # The FastNorm weights first: their update reads the gains as the
        # forward saw them. Then torch's SGD for the rest (if any has a gradient),
        # with what was updated here hidden from it: the dense-mode weight
        # gradients (it would update V as if it were W), and the gains and biases
        # that the compiled fused step updated itself.
        distributed = _distributed()
        updated = []  # parameters updated here, hidden from torch's SGD
        for layer, group, weight in layers:
            if distributed and layer.mode == "fused":
                raise RuntimeError(
                    f"{type(layer).__name__}(mode='fused') updates its weight from this "
                    "process's samples only; under torch.distributed use mode='dense' (or "
                    "normlab.convert_sync(model)), whose gradient DDP all-reduces.")
            updated.append(weight)  # dense: its gradient is the logical weight's, not V's
            updated.extend(layer.sgd_step(group["lr"], group["weight_decay"],
                                           group["momentum"], self.state[weight]))
        hidden = [(param, param.grad) for param in updated]
        for param, _ in hidden:
            param.grad = None
        try:
            if any(param.grad is not None for group in self.param_groups
                   for param in group["params"]):
                super().step()
        finally:
            for param, grad in hidden:
                param.grad = grad
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for layer, _, _ in self._fastnorm_layers():
            layer.discard_finished_records()
        super().zero_grad(set_to_none)


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)

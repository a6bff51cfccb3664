"""fold(): an inference copy of a model made of plain torch layers.

Two rewrites, on an evaluation-mode copy:

1. Every layer with a ``to_plain()`` method (the weight normalizers:
   WeightNorm, scaled WeightNorm, NormProp, EquiNorm, FastNorm) becomes the
   ``nn.Linear`` / ``nn.Conv2d`` that computes its evaluation-mode function.
2. Every activation normalizer with running statistics (``nn.BatchNorm1d/2d``,
   ``BatchRenorm1d/2d``, ``OnlineNorm1d/2d`` with ``ecm="ac"`` or None) that
   directly follows a plain ``nn.Linear`` / ``nn.Conv2d`` in an
   ``nn.Sequential`` (the next child) is folded into it: in evaluation it is
   the per-channel affine map

       y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,

   so the layer's kernel rows scale by s = weight / sqrt(running_var + eps)
   and its bias becomes (bias - running_mean) s + weight's shift. The
   normalizer leaves the Sequential (the other children keep their names);
   Online Normalization's "ac" clamp stays, as an ``nn.Hardtanh``.

Anything else stays as it is, in evaluation mode: a normalizer after another
kind of module or outside a Sequential (a residual block's ``self.bn1``),
batch statistics (``track_running_stats=False``), Online Normalization's
"ls" compensation (it divides each sample by its own second moment). A
Linear followed by a 1d normalizer folds on the assumption of (N, C) inputs:
the normalizer's channel dim is the Linear's output features.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from .layers.batch_renorm import BatchRenorm1d, BatchRenorm2d
from .layers.online import OnlineNorm1d, OnlineNorm2d

_WITH_RUNNING_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, BatchRenorm1d, BatchRenorm2d,
                       OnlineNorm1d, OnlineNorm2d)


def fold(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """An evaluation-mode copy of `model` computing its evaluation-mode function with plain
    torch layers (module docstring: what is folded, and where).

    Args:
        model: left unchanged.
        example_input: needed only by layers whose plain form depends on
            their input size (an EquiNormConv2d that changes the spatial
            size); one forward pass records each layer's input size, and
            the copy is exact at those sizes.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> folded = normlab.fold(model)
        >>> folded
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (2): ReLU()
        )
    """
    model = copy.deepcopy(model).eval()
    input_sizes = _input_sizes(model, example_input) if example_input is not None else {}
    _to_plain(model, input_sizes)
    _fold_sequentials(model)
    return model


def _input_sizes(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, tuple]:
    """The spatial size (H, W) of each to_plain layer's input on `example_input`."""
    sizes = {}

    def record(module, args):
        sizes[module] = tuple(args[0].shape[2:])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if hasattr(m, "to_plain")]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _to_plain(parent: nn.Module, input_sizes: dict) -> None:
    for name, child in parent.named_children():
        if hasattr(child, "to_plain"):
            plain = (child.to_plain(input_sizes.get(child)) if child in input_sizes
                     else child.to_plain())
            setattr(parent, name, plain.eval())
        else:
            _to_plain(child, input_sizes)


def _fold_sequentials(module: nn.Module) -> None:
    for child in module.children():
        _fold_sequentials(child)
    if type(module) is nn.Sequential:  # a subclass may not run its children in order
        module._modules = _folded_children(module)


def _folded_children(sequential: nn.Sequential) -> OrderedDict[str, nn.Module]:
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    previous = None
    for name, module in sequential.named_children():
        if type(previous) in (nn.Linear, nn.Conv2d) and _foldable(module, previous):
            _fold_into(previous, module)
            if isinstance(module, (OnlineNorm1d, OnlineNorm2d)) and module.ecm == "ac":
                kept[name] = previous = nn.Hardtanh(-module.clamp_val, module.clamp_val)
            continue
        kept[name] = previous = module
    return kept


def _foldable(norm: nn.Module, layer: nn.Module) -> bool:
    if not isinstance(norm, _WITH_RUNNING_STATS) or norm.running_mean is None:
        return False
    if isinstance(norm, (OnlineNorm1d, OnlineNorm2d)) and norm.ecm == "ls":
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return norm.num_features == channels


@torch.no_grad()
def _fold_into(layer: nn.Linear | nn.Conv2d, norm: nn.Module) -> None:
    """layer <- norm o layer, for `norm` in evaluation mode; computed in float64."""
    weight = layer.weight.double()
    bias = (layer.bias.double() if layer.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    shift = -norm.running_mean.double() * scale
    if norm.weight is not None:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double()
        shift = shift + norm.bias.double()
    per_unit = (-1,) + (1,) * (weight.dim() - 1)
    layer.weight.copy_(weight * scale.view(per_unit))
    if layer.bias is None:
        layer.bias = nn.Parameter(layer.weight.new_empty(weight.shape[0]))
    layer.bias.copy_(bias * scale + shift)

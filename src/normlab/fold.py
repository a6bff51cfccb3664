"""fold(): an inference copy of a model made of plain torch layers.

Two rewrites, on an evaluation-mode copy:

1. Every weight normalizer (a :class:`~normlab.layers._base.WeightNormalizedLayer`)
   becomes, through its ``to_plain()``, the ``nn.Linear`` / ``nn.Conv2d`` that
   computes its evaluation-mode function.
2. Every activation normalizer whose evaluation-mode function is a per-channel
   affine map (torch's BatchNorm with running statistics, and each normlab
   normalizer whose ``eval_affine_form()`` gives one: Batch Renormalization,
   Online Normalization with ``ecm="ac"`` or None) that directly follows a
   plain ``nn.Linear`` / ``nn.Conv2d`` in an ``nn.Sequential`` (the next
   child) is folded into it. With running statistics that map is

       y = (x - running_mean) / sqrt(running_var + eps) * weight + bias,

   so the layer's kernel rows scale by s = weight / sqrt(running_var + eps)
   and its bias becomes (bias - running_mean) s + weight's shift. The
   normalizer leaves the Sequential (the other children keep their names); what
   its form keeps after the map stays (Online Normalization's "ac" clamp, as an
   ``nn.Hardtanh``).

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

from .layers._base import ActivationNorm, AffineForm, WeightNormalizedLayer, running_stats_affine


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
    """The spatial size (H, W) of the input of each layer whose plain form needs it, on
    `example_input`."""
    sizes = {}

    def record(module, args):
        sizes[module] = tuple(args[0].shape[2:])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, WeightNormalizedLayer) and m.plain_form_needs_input_size]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _to_plain(parent: nn.Module, input_sizes: dict) -> None:
    for name, child in parent.named_children():
        if isinstance(child, WeightNormalizedLayer):
            setattr(parent, name, child.to_plain(input_sizes.get(child)).eval())
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
        form = _affine_form(module, previous) if type(previous) in (nn.Linear, nn.Conv2d) \
            else None
        if form is not None:
            _fold_into(previous, form)
            if form.after is not None:
                kept[name] = previous = form.after
            continue
        kept[name] = previous = module
    return kept


def _affine_form(norm: nn.Module, layer: nn.Linear | nn.Conv2d) -> AffineForm | None:
    """`norm`'s evaluation-mode affine form, if it has one over `layer`'s output channels."""
    if isinstance(norm, ActivationNorm):
        form = norm.eval_affine_form()
    elif isinstance(norm, nn.modules.batchnorm._BatchNorm):  # torch's contract (_NormBase)
        form = running_stats_affine(norm)
    else:
        return None
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return form if form is not None and norm.num_features == channels else None


@torch.no_grad()
def _fold_into(layer: nn.Linear | nn.Conv2d, form: AffineForm) -> None:
    """layer <- (x -> x * form.scale + form.shift) o layer; computed in float64."""
    weight = layer.weight.double()
    bias = (layer.bias.double() if layer.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    per_unit = (-1,) + (1,) * (weight.dim() - 1)
    layer.weight.copy_(weight * form.scale.view(per_unit))
    if layer.bias is None:
        layer.bias = nn.Parameter(layer.weight.new_empty(weight.shape[0]))
    layer.bias.copy_(bias * form.scale + form.shift)

"""freeze() / unfreeze(): a model's normalizers held at their running statistics, in place.

What torchvision's FrozenBatchNorm2d does for one class, for every module with running
statistics (a ``running_mean`` tensor: torch's BatchNorm and InstanceNorm with
``track_running_stats``, normlab's Batch Renormalization, Online Normalization and
EquiNorm), without replacing any module, so the state_dict keeps its keys.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .layers._base import ActivationNorm
from .module_kinds import FROZEN_ATTRIBUTE, frozen


def _has_running_statistics(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor)


def _stays_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """A frozen module's ``train``: evaluation mode whatever `mode` (``model.train()`` reaches
    each module through its ``train``)."""
    return nn.Module.train(module, False)


def freeze(model: nn.Module) -> nn.Module:
    """Hold every normalizer of `model` with running statistics at them, in place.

    Each module with a ``running_mean`` tensor normalizes with its running statistics and
    stops updating them, even when the model trains: it stays in evaluation mode through
    ``model.train()``. The affine parameters (``weight``, ``bias``) of an activation
    normalizer (torch's or normlab's) stop receiving gradients (``requires_grad=False``);
    a weight normalizer with running statistics (EquiNorm) keeps training its weights. A
    normalizer without running statistics (``track_running_stats=False``, GroupNorm) is
    left as it is. No module is replaced: the state_dict keys are unchanged, and
    `normlab.convert_sync` leaves a frozen normalizer as it is (it uses no batch
    statistics). Freezing a frozen module changes nothing; :func:`unfreeze` undoes it.

    Returns:
        `model`.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> model = normlab.freeze(model).train()
        >>> model[1].training, model[1].weight.requires_grad
        (False, False)
        >>> model = normlab.unfreeze(model)
        >>> model[1].training, model[1].weight.requires_grad
        (True, True)
    """
    for module in model.modules():
        if not _has_running_statistics(module) or frozen(module):
            continue
        affine = dict(module.named_parameters(recurse=False)) if isinstance(
            module, (ActivationNorm, nn.modules.batchnorm._NormBase)) else {}
        vars(module)[FROZEN_ATTRIBUTE] = {name: p.requires_grad for name, p in affine.items()}
        for parameter in affine.values():
            parameter.requires_grad_(False)
        module.train = functools.partial(_stays_in_eval, module)
        module.train(False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze` on `model`, in place: each frozen module trains again, its affine
    parameters get back their ``requires_grad``, and it takes `model`'s training mode.

    Returns:
        `model`.
    """
    for module in model.modules():
        requires_grad = vars(module).pop(FROZEN_ATTRIBUTE, None)
        if requires_grad is None:
            continue
        del vars(module)["train"]
        for name, flag in requires_grad.items():
            getattr(module, name).requires_grad_(flag)
        module.train(model.training)
    return model

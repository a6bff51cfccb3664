"""What `convert`, `convert_sync` and `fold` take a module for: the torch class of normalizer or
weight layer it derives from (matched with isinstance, so subclasses count), and whether a
subclass computes what that class computes.

A subclass that overrides ``forward`` may compute something else (timm's ``BatchNormAct2d`` is a
BatchNorm2d followed by an activation), so it is never silently replaced by a layer of its base's
kind: it is replaced only when registered with the steps its forward adds after its base's
computation (:func:`register_norm_subclass`), and refused, by name, otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

# torch's normalizer classes, each before its bases, with the input dim the class fixes
# (1: (N, C[, L]), 2: (N, C, H, W), 3: (N, C, D, H, W); None: the class does not say)
TORCH_NORMS: tuple[tuple[type[nn.Module], int | None], ...] = (
    (nn.SyncBatchNorm, None),
    (nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3),
    (nn.modules.batchnorm._BatchNorm, None),
    (nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3),
    (nn.modules.instancenorm._InstanceNorm, None),
    (nn.GroupNorm, None), (nn.LayerNorm, 1),
)

# torch's layers with weights over channels or features: the layers a weight normalizer
# could stand for (convert reports the ones its target cannot replace)
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.MultiheadAttention)

# the attribute `normlab.freeze` gives a module it freezes (its affine parameters'
# requires_grad flags, for unfreeze)
FROZEN_ATTRIBUTE = "_normlab_frozen_requires_grad"

_EXTRA_STEPS: dict[type, Callable[[nn.Module], list[nn.Module]]] = {}


def register_norm_subclass(cls: type[nn.Module],
                           extra_steps: Callable[[nn.Module], list[nn.Module]]) -> None:
    """Let `convert` and `convert_sync` replace `cls`, a subclass of a torch normalizer that
    overrides its ``forward``.

    Args:
        cls: the subclass.
        extra_steps: ``extra_steps(module)`` gives, in order, the modules that ``cls.forward``
            applies after its base's computation (for timm's BatchNormAct2d: its ``drop`` and
            ``act``); the replacement of `module` is ``nn.Sequential(new normalizer, *steps)``
            (or the steps alone where the normalizer is dropped).

    Example:
        >>> class BatchNormReLU(nn.BatchNorm2d):
        ...     def __init__(self, num_features):
        ...         super().__init__(num_features)
        ...         self.act = nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(super().forward(x))
        >>> normlab.register_norm_subclass(BatchNormReLU, lambda m: [m.act])
        >>> normlab.convert(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormReLU(8)), "group")[1]
        Sequential(
          (0): GroupNorm(8, 8, eps=1e-05, affine=True...)
          (1): ReLU()
        )
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_norm_subclass expects an nn.Module subclass, got {cls!r}")
    if not callable(extra_steps):
        raise TypeError(f"register_norm_subclass: extra_steps must be callable, "
                        f"got {extra_steps!r}")
    _EXTRA_STEPS[cls] = extra_steps


def torch_norm(module: nn.Module) -> tuple[type[nn.Module], int | None] | None:
    """(torch normalizer class, the dim it fixes) that `module` is an instance of, the most
    specific first; None when it is none of :data:`TORCH_NORMS`."""
    return next(((cls, dim) for cls, dim in TORCH_NORMS if isinstance(module, cls)), None)


def frozen(module: nn.Module) -> bool:
    """Whether `normlab.freeze` holds `module` at its running statistics."""
    return FROZEN_ATTRIBUTE in vars(module)


def forward_owner(cls: type) -> type:
    """The class in `cls`'s method resolution order that defines the ``forward`` it runs."""
    return next(c for c in cls.__mro__ if "forward" in vars(c))


def uninitialized(module: nn.Module) -> bool:
    """Whether `module` is a lazy module whose parameters do not exist yet (no forward pass)."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def extra_steps(module: nn.Module, base: type[nn.Module], replacement: str) -> list[nn.Module]:
    """The modules that must follow a `replacement` of `module`, a `base`, for it to compute
    what `module` computes: the registered steps of a known subclass
    (:func:`register_norm_subclass`), else none (`require_base_forward`)."""
    if type(module) in _EXTRA_STEPS:
        return list(_EXTRA_STEPS[type(module)](module))
    require_base_forward(module, base, replacement,
                         remedy=f"declare the steps its forward adds with normlab."
                                f"register_norm_subclass({type(module).__name__}, extra_steps), "
                                f"or replace it yourself")
    return []


def require_base_forward(module: nn.Module, base: type[nn.Module], replacement: str,
                         remedy: str = "replace it yourself") -> None:
    """A ValueError naming `module`'s class unless it runs the forward of `base`, so that a
    `replacement` in its place computes what it computes."""
    cls = type(module)
    if forward_owner(cls) is not forward_owner(base):
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} overrides the forward of {base.__name__}, "
            f"so a {replacement} in its place would drop what it adds; {remedy}")

"""The registry: short name -> normalization method; `create` and `convert`.

Three families of methods live here:

* ``activation``: a module placed after a linear/conv layer that normalizes its
  output (BatchNorm, GroupNorm, Online Normalization, ...). Built by
  :func:`create`.
* ``weight``: a drop-in replacement for ``nn.Linear``/``nn.Conv2d`` that
  normalizes its weights (WeightNorm, NormProp, FastNorm, EquiNorm, ...).
  Swapped in by :func:`convert` through each class's ``from_module``.
* ``rebalancer``: an optimizer companion that rescales weights between steps
  without changing the network's function (ENorm).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from . import checks
from .layers.batch_renorm import BatchRenorm1d, BatchRenorm2d
from .layers.equinorm import EquiNormConv1d, EquiNormConv2d, EquiNormConv3d, EquiNormLinear
from .layers.fastnorm import FastNormConv1d, FastNormConv2d, FastNormConv3d, FastNormLinear
from .layers.filter_response_norm import FilterResponseNorm1d, FilterResponseNorm2d
from .layers.layer_norm import VectorLayerNorm
from .layers.online import OnlineNorm1d, OnlineNorm2d
from .layers.weight_norm import (
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropLinear,
    ScaledWeightNormConv1d,
    ScaledWeightNormConv2d,
    ScaledWeightNormConv3d,
    ScaledWeightNormLinear,
    WeightNormConv1d,
    WeightNormConv2d,
    WeightNormConv3d,
    WeightNormLinear,
)
from .layers.weight_standardization import (
    WeightStandardizedConv1d,
    WeightStandardizedConv2d,
    WeightStandardizedConv3d,
)
from .optim import FastNormSGD
from .rebalancers import ENorm, Renormalize

FAMILIES = ("activation", "weight", "rebalancer")


@dataclass(frozen=True)
class Method:
    """One registered normalization method.

    Attributes:
        name: the short name used everywhere (CLI, recipes, `create`).
        family: ``"activation"``, ``"weight"`` or ``"rebalancer"``.
        paper: the reference, as "Authors (year), title".
        summary: one line for `normlab list`.
        build: activation family: ``build(num_features, dim, **kw)`` returns the
            module (``dim`` is 1 for (N, C[, L]) inputs, 2 for (N, C, H, W)).
            Rebalancer family: the companion class.
        replaces: weight family: torch layer type -> normalized class with a
            ``from_module(m, **kw)`` classmethod.
        first_layer_kw: weight family: extra keywords for the first layer of a
            model, which sees data instead of activations (NormProp).
        dims: activation family: normlab classes -> spatial dims (1 or 2), so
            that `convert` can swap them back out.
        optimizer: builds the optimizer the method needs, called like
            ``torch.optim.SGD(params, lr=..., momentum=..., weight_decay=...)``;
            None means plain SGD.
        pairs_with: rebalancer family: the family of the layer normalizers it
            runs beside (``"activation"``, which includes ``none``: it rescales
            plain Linear/Conv2d weights; ``"weight"``: it rescales the rows of
            weight-normalized layers).
    """

    name: str
    family: str
    paper: str
    summary: str
    build: Callable[..., object] | None = None
    replaces: dict[type, type] = field(default_factory=dict)
    first_layer_kw: dict[str, object] = field(default_factory=dict)
    dims: dict[type, int] = field(default_factory=dict)
    optimizer: Callable[..., object] | None = None
    pairs_with: str = "activation"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.pairs_with not in ("activation", "weight"):
            raise ValueError(f"pairs_with must be 'activation' or 'weight', "
                             f"got {self.pairs_with!r}")


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _group_norm(num_features: int, dim: int, num_groups: int | None = None, **kw) -> nn.Module:
    if num_groups is None:
        num_groups = _largest_divisor_at_most(num_features, 32)
    if num_features % num_groups:
        raise ValueError(
            f"group: num_groups must divide num_features; got {num_groups} groups "
            f"for {num_features} features"
        )
    return nn.GroupNorm(num_groups, num_features, **kw)


def _layer_norm(num_features: int, dim: int, **kw) -> nn.Module:
    # Layer norm normalizes each sample over (C, ...) with a per-channel affine:
    # for images GroupNorm with one group is exactly that and, unlike
    # nn.LayerNorm, needs no spatial size in advance.
    if dim == 1:
        return VectorLayerNorm(num_features, **kw)
    return nn.GroupNorm(1, num_features, **kw)


def _instance_norm(num_features: int, dim: int, **kw) -> nn.Module:
    kw.setdefault("affine", True)
    if dim == 1:
        # nn.InstanceNorm1d reads an (N, C) batch as one unbatched (C, L)
        # sample, a silent wrong answer; one group per channel is the true
        # per-sample, per-channel normalization for (N, C) and (N, C, L).
        return nn.GroupNorm(num_features, num_features, affine=kw.pop("affine"), **kw)
    return nn.InstanceNorm2d(num_features, **kw)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (names are unique)."""
    if method.name in _REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def activation_method(name: str, paper: str, summary: str, classes: tuple[type, ...]
                      ) -> Method:
    """The record of an activation normalizer from its classes (one per `dim` they declare):
    `build` picks the class of the dim asked for."""
    by_dim = {cls.dim: cls for cls in classes}
    return Method(name, "activation", paper, summary,
                  build=lambda num_features, dim, **kw: by_dim[dim](num_features, **kw),
                  dims={cls: cls.dim for cls in classes})


def weight_method(name: str, paper: str, summary: str, classes: tuple[type, ...],
                  optimizer: Callable[..., object] | None = None) -> Method:
    """The record of a weight normalizer from its classes: each replaces its `plain_type`;
    the first layer of a model gets what the classes declare in `first_layer_kw`."""
    first_layer_kw = {}
    for cls in classes:
        first_layer_kw.update(cls.first_layer_kw)
    return Method(name, "weight", paper, summary, replaces={cls.plain_type: cls for cls in classes},
                  first_layer_kw=first_layer_kw, optimizer=optimizer)


# -- activation normalizers ----------------------------------------------------
register(Method("none", "activation", "-", "no normalization (identity)",
                build=lambda num_features, dim, **kw: nn.Identity()))
register(Method("batch", "activation", "Ioffe and Szegedy (2015), Batch Normalization",
                "normalize each channel with batch statistics (torch)",
                build=lambda num_features, dim, **kw:
                    (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(num_features, **kw)))
register(Method("layer", "activation", "Ba, Kiros and Hinton (2016), Layer Normalization",
                "normalize each sample over all its channels (torch)", build=_layer_norm,
                dims={VectorLayerNorm: 1}))
register(Method("group", "activation", "Wu and He (2018), Group Normalization",
                "normalize each sample over groups of channels (torch)", build=_group_norm))
register(Method("instance", "activation",
                "Ulyanov, Vedaldi and Lempitsky (2016), Instance Normalization",
                "normalize each sample and channel over positions (torch)",
                build=_instance_norm))
register(activation_method("batch_renorm", "Ioffe (2017), Batch Renormalization",
                           "batch normalization corrected towards the running statistics",
                           (BatchRenorm1d, BatchRenorm2d)))
register(activation_method("online",
                           "Chiley et al. (2019), Online Normalization for Training Neural "
                           "Networks",
                           "normalize each sample with running statistics of the samples "
                           "before it", (OnlineNorm1d, OnlineNorm2d)))

register(activation_method("frn",
                           "Singh and Krishnan (2020), Filter Response Normalization Layer: "
                           "Eliminating Batch Dependence in the Training of Deep Neural "
                           "Networks, arXiv:1911.09737",
                           "divide each sample's channel by its root mean square, then a "
                           "learned-threshold ReLU (TLU)",
                           (FilterResponseNorm1d, FilterResponseNorm2d)))

# -- weight normalizers ----------------------------------------------------------
register(weight_method("weight_norm",
                       "Salimans and Kingma (2016), Weight Normalization: a simple "
                       "reparameterization to accelerate training of deep neural networks",
                       "normalize each weight row, learn its length",
                       (WeightNormLinear, WeightNormConv1d, WeightNormConv2d, WeightNormConv3d)))
register(weight_method("scaled_weight_norm",
                       "Arpit and Bengio (2019), The benefits of over-parameterization at "
                       "initialization in deep ReLU networks",
                       "weight norm times sqrt(2 fan_in / fan_out): norm-preserving at init",
                       (ScaledWeightNormLinear, ScaledWeightNormConv1d, ScaledWeightNormConv2d,
                        ScaledWeightNormConv3d)))
register(weight_method("normprop",
                       "Arpit, Zhou, Kota and Govindaraju (2016), Normalization Propagation",
                       "weight norm on inputs standardized with a ReLU's known statistics",
                       (NormPropLinear, NormPropConv1d, NormPropConv2d, NormPropConv3d)))
register(weight_method("fastnorm",
                       "Anonymous (2019), FastNorm: improving numerical stability of neural "
                       "network training with efficient normalization (ICLR submission)",
                       "weight normalization whose row norms are tracked, not computed",
                       (FastNormLinear, FastNormConv1d, FastNormConv2d, FastNormConv3d),
                       optimizer=FastNormSGD))
register(weight_method("equinorm",
                       "Defazio and Bottou (2018), Controlling covariate shift using "
                       "balanced normalization of weights, arXiv:1812.04549 (as an ICLR 2019 "
                       "submission: equilibrium normalization)",
                       "shift and scale each kernel so positive and negative weights balance "
                       "(EquiNorm)",
                       (EquiNormLinear, EquiNormConv1d, EquiNormConv2d, EquiNormConv3d)))
register(weight_method("weight_standardization",
                       "Qiao, Wang, Liu, Shen and Yuille (2019), Micro-Batch Training with "
                       "Batch-Channel Normalization and Weight Standardization, "
                       "arXiv:1903.10520",
                       "standardize each conv kernel (zero mean, unit std); pair with group",
                       (WeightStandardizedConv1d, WeightStandardizedConv2d,
                        WeightStandardizedConv3d)))

# -- rebalancers -------------------------------------------------------------------
register(Method("enorm", "rebalancer", "Stock et al. (2019), Equi-normalization of Neural Networks",
                "rebalance each hidden unit's in/out weights after every step (function kept)",
                build=ENorm))
register(Method("renorm", "rebalancer",
                "Anonymous (2019), FastNorm: improving numerical stability of neural network "
                "training with efficient normalization (ICLR submission), section 3.1",
                "rescale weight-normalized rows to unit norm after every step (explicit "
                "normalization)", build=Renormalize, pairs_with="weight"))


def available() -> list[str]:
    """The short names of the registered methods, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Method:
    """The registered method called `name`; ValueError listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown normalization {name!r}; valid names: {', '.join(available())}"
        ) from None


def create(name: str, num_features: int, dim: int = 2, **kw) -> nn.Module:
    """Build the activation normalizer `name` for `num_features` channels.

    Args:
        name: an activation normalizer of :func:`available`.
        num_features: C, the channels normalized.
        dim: 1 for inputs of shape (N, C) or (N, C, L), 2 for (N, C, H, W).
        **kw: to the layer (for example ``num_groups`` for ``group``, which
            defaults to 32 or the largest divisor of num_features below it;
            ``device`` and ``dtype``).

    Example:
        >>> normlab.create("group", 64, num_groups=8)
        GroupNorm(8, 64, eps=1e-05, affine=True...)
    """
    method = get(name)
    if method.family != "activation":
        raise ValueError(
            f"{name!r} is a {method.family} method, not an activation normalizer: "
            f"use normlab.convert(model, {name!r}) or its class directly"
        )
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 (for (N, C[, L]) inputs) or 2 (for (N, C, H, W)); "
                         f"got {dim!r}")
    checks.positive_int(f"create({name!r})", "num_features", num_features)
    return method.build(num_features, dim, **kw)


_TORCH_NORM_DIMS: dict[type, int] = {
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2,
    nn.LayerNorm: 1, nn.GroupNorm: 2,
}


def _activation_norm_dims() -> dict[type, int]:
    dims = dict(_TORCH_NORM_DIMS)
    for method in _REGISTRY.values():
        dims.update(method.dims)
    return dims


def _num_features(norm: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if hasattr(norm, attr):
            return getattr(norm, attr)
    return norm.normalized_shape[0]


def _factory_kw(module: nn.Module) -> dict:
    """The device and dtype of `module`'s first floating-point tensor ({} if it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _copy_affine(source: nn.Module, target: nn.Module) -> None:
    for name in ("weight", "bias"):
        src, dst = getattr(source, name, None), getattr(target, name, None)
        if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
            if src.shape == dst.shape:
                dst.data.copy_(src.data)


def convert(model: nn.Module, name: str, keep_activation_norm: bool = False,
            dim: int | None = None, **kw) -> nn.Module:
    """Return a copy of `model` with its normalization swapped for `name`.

    * Activation target: every BatchNorm/GroupNorm/LayerNorm/InstanceNorm (and
      normlab activation normalizer) becomes `name` with the same number of
      features; the affine parameters are copied where the shapes match. A
      GroupNorm does not say whether it normalizes images or vectors: it is
      taken as 2d unless `dim` says otherwise.
    * Weight target: each torch layer the method replaces (nn.Linear, nn.ConvNd)
      becomes the normalized layer through its ``from_module``, so the function is
      unchanged at that moment where the class declares ``from_module_keeps_function``
      (EquiNorm and Weight Standardization do not: their docstrings say what they keep),
      and the activation normalizers become nn.Identity, unless
      ``keep_activation_norm=True``.

    Each new layer is built on the device and in the dtype of the layer it
    replaces (of the model, for a layer without parameters or buffers) and
    takes its training mode. The input model is not modified.

    Args:
        model: the model to copy.
        name: a method of :func:`available` (not a rebalancer).
        keep_activation_norm: weight target: keep the activation normalizers.
        dim: activation target: the dim of GroupNorm layers (1 or 2; default 2).
        **kw: to each new layer.

    Example:
        >>> bn_model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        >>> normlab.convert(bn_model, "group", num_groups=8)[1]
        GroupNorm(8, 16, eps=1e-05, affine=True...)
    """
    method = get(name)
    if method.family == "rebalancer":
        raise ValueError(
            f"{name!r} is a rebalancer: it runs beside the optimizer and changes no "
            f"layer; use normlab.{getattr(method.build, '__name__', name)}(model, optimizer)"
        )
    model = copy.deepcopy(model)
    model_factory = _factory_kw(model)
    norm_dims = _activation_norm_dims()
    first_weight_layer = True

    def swap(parent: nn.Module) -> None:
        nonlocal first_weight_layer
        for child_name, child in parent.named_children():
            new = None
            if type(child) in norm_dims:
                if method.family == "activation":
                    child_dim = dim if isinstance(child, nn.GroupNorm) and dim else \
                        norm_dims[type(child)]
                    factory = _factory_kw(child) or model_factory
                    new = create(name, _num_features(child), child_dim, **{**factory, **kw})
                    _copy_affine(child, new)
                elif not keep_activation_norm:
                    new = nn.Identity()
            elif method.family == "weight" and type(child) in method.replaces:
                layer_kw = dict(kw)
                if first_weight_layer:
                    layer_kw.update(method.first_layer_kw)
                new = method.replaces[type(child)].from_module(child, **layer_kw)
            if method.family == "weight" and isinstance(child, (nn.Linear, nn.Conv2d)):
                first_weight_layer = False
            if new is not None:
                setattr(parent, child_name, new.train(child.training))
            else:
                swap(child)

    swap(model)
    return model

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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checks, module_kinds
from .fold import feeds, traced
from .layers._base import WeightNormalizedLayer
from .layers.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .layers.equinorm import EquiNormConv1d, EquiNormConv2d, EquiNormConv3d, EquiNormLinear
from .layers.fastnorm import FastNormConv1d, FastNormConv2d, FastNormConv3d, FastNormLinear
from .layers.filter_response_norm import (
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
)
from .layers.layer_norm import VectorLayerNorm
from .layers.online import OnlineNorm1d, OnlineNorm2d, OnlineNorm3d
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
            module (``dim`` is 1 for (N, C[, L]) inputs, 2 for (N, C, H, W), 3 for
            (N, C, D, H, W)).
        rebalancer: rebalancer family: the class run beside the optimizer,
            ``rebalancer(model, optimizer, **kw)`` with a ``step()``.
        replaces: weight family: torch layer type -> normalized class with a
            ``from_module(m, **kw)`` classmethod.
        first_layer_kw: weight family: extra keywords for the first layer of a
            model, which sees data instead of activations (NormProp).
        dims: activation family: normlab classes -> spatial dims (1, 2 or 3), so
            that `convert` can swap them back out.
        optimizer: builds the optimizer the method needs, called like
            ``torch.optim.SGD(params, lr=..., momentum=..., weight_decay=...)``;
            None means plain SGD.
        pairs_with: rebalancer family: the family of the layer normalizers it
            runs beside (``"activation"``, which includes ``none``: it rescales
            plain Linear/Conv2d weights; ``"weight"``: it rescales the rows of
            weight-normalized layers).
        label: the name reports and figures show (default: `name`).
        batch_free: a normalizer that uses no batch statistics: in training as in
            evaluation each sample is normalized by its own values (or, for Online
            Normalization, by running statistics of the samples before it), so it trains
            at any batch size, 1 included. Declared by activation normalizers; every
            weight normalizer is one. Batch-size comparisons (the onlinenorm recipe) run
            every such method.
        needs_positions: activation family: normalizes each channel over a sample's
            positions alone, so that on (N, C) features, which have none, its output is
            constant (InstanceNorm); a comparison on an MLP leaves it out.
        activation_pair: weight family: the activation normalizer its paper runs it with
            (Weight Standardization: ``"group"``), or None when it runs alone; training's
            norm spec ``"group+weight_standardization"`` builds the pair.
    """

    name: str
    family: str
    paper: str
    summary: str
    build: Callable[..., object] | None = None
    rebalancer: type | None = None
    replaces: dict[type, type] = field(default_factory=dict)
    first_layer_kw: dict[str, object] = field(default_factory=dict)
    dims: dict[type, int] = field(default_factory=dict)
    optimizer: Callable[..., object] | None = None
    pairs_with: str = "activation"
    label: str = ""
    batch_free: bool = False
    needs_positions: bool = False
    activation_pair: str | None = None

    @property
    def classes(self) -> tuple[type, ...]:
        """normlab's classes that implement this method: its layers, its rebalancer, its
        optimizer (none for the methods torch provides)."""
        found = [*self.dims, *self.replaces.values()]
        for companion in (self.rebalancer, self.optimizer):
            if isinstance(companion, type):
                found.append(companion)
        return tuple(found)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if (self.family == "rebalancer") != (self.rebalancer is not None):
            raise ValueError(f"{self.name}: a rebalancer method names its class in `rebalancer`, "
                             f"and only a rebalancer method does")
        if self.pairs_with not in ("activation", "weight"):
            raise ValueError(f"pairs_with must be 'activation' or 'weight', "
                             f"got {self.pairs_with!r}")
        if self.activation_pair is not None and self.family != "weight":
            raise ValueError(f"{self.name}: only a weight normalizer runs with an "
                             f"activation_pair, got one for family {self.family!r}")
        if not self.label:
            object.__setattr__(self, "label", self.name)  # (frozen: set once, here)


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


def _batch_norm(num_features: int, dim: int, **kw) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](num_features, **kw)


def _instance_norm(num_features: int, dim: int, **kw) -> nn.Module:
    kw.setdefault("affine", True)
    if dim == 1:
        # nn.InstanceNorm1d reads an (N, C) batch as one unbatched (C, L)
        # sample, a silent wrong answer; one group per channel is the true
        # per-sample, per-channel normalization for (N, C) and (N, C, L).
        return nn.GroupNorm(num_features, num_features, affine=kw.pop("affine"), **kw)
    return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(num_features, **kw)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (names are unique)."""
    if method.name in _REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def activation_method(name: str, paper: str, summary: str, classes: tuple[type, ...],
                      label: str = "", batch_free: bool = False) -> Method:
    """The record of an activation normalizer from its classes (one per `dim` they declare):
    `build` picks the class of the dim asked for."""
    by_dim = {cls.dim: cls for cls in classes}
    return Method(name, "activation", paper, summary,
                  build=lambda num_features, dim, **kw: by_dim[dim](num_features, **kw),
                  dims={cls: cls.dim for cls in classes}, label=label, batch_free=batch_free)


def weight_method(name: str, paper: str, summary: str, classes: tuple[type, ...],
                  optimizer: Callable[..., object] | None = None, label: str = "",
                  activation_pair: str | None = None) -> Method:
    """The record of a weight normalizer from its classes: each replaces its `plain_type`;
    the first layer of a model gets what the classes declare in `first_layer_kw`. It is
    batch-free: its statistics are its weights'."""
    first_layer_kw = {}
    for cls in classes:
        first_layer_kw.update(cls.first_layer_kw)
    return Method(name, "weight", paper, summary, replaces={cls.plain_type: cls for cls in classes},
                  first_layer_kw=first_layer_kw, optimizer=optimizer, label=label,
                  batch_free=True, activation_pair=activation_pair)


# -- activation normalizers ----------------------------------------------------
register(Method("none", "activation", "-", "no normalization (identity)",
                build=lambda num_features, dim, **kw: nn.Identity()))
register(Method("batch", "activation", "Ioffe and Szegedy (2015), Batch Normalization",
                "normalize each channel with batch statistics (torch)",
                build=_batch_norm, label="BatchNorm"))
register(Method("layer", "activation", "Ba, Kiros and Hinton (2016), Layer Normalization",
                "normalize each sample over all its channels (torch)", build=_layer_norm,
                dims={VectorLayerNorm: 1}, label="LayerNorm", batch_free=True))
register(Method("group", "activation", "Wu and He (2018), Group Normalization",
                "normalize each sample over groups of channels (torch)", build=_group_norm,
                label="GroupNorm", batch_free=True))
register(Method("instance", "activation",
                "Ulyanov, Vedaldi and Lempitsky (2016), Instance Normalization",
                "normalize each sample and channel over positions (torch)",
                build=_instance_norm, label="InstanceNorm", batch_free=True,
                needs_positions=True))
register(activation_method("batch_renorm", "Ioffe (2017), Batch Renormalization",
                           "batch normalization corrected towards the running statistics",
                           (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d), label="Batch Renorm"))
register(activation_method("online",
                           "Chiley et al. (2019), Online Normalization for Training Neural "
                           "Networks",
                           "normalize each sample with running statistics of the samples "
                           "before it", (OnlineNorm1d, OnlineNorm2d, OnlineNorm3d),
                           label="Online Norm", batch_free=True))

register(activation_method("frn",
                           "Singh and Krishnan (2020), Filter Response Normalization Layer: "
                           "Eliminating Batch Dependence in the Training of Deep Neural "
                           "Networks, arXiv:1911.09737",
                           "divide each sample's channel by its root mean square, then a "
                           "learned-threshold ReLU (TLU)",
                           (FilterResponseNorm1d, FilterResponseNorm2d,
                            FilterResponseNorm3d), label="FRN", batch_free=True))

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
                        WeightStandardizedConv3d), label="Weight Standardization",
                       activation_pair="group"))

# -- rebalancers -------------------------------------------------------------------
register(Method("enorm", "rebalancer", "Stock et al. (2019), Equi-normalization of Neural Networks",
                "rebalance each hidden unit's in/out weights after every step (function kept)",
                rebalancer=ENorm))
register(Method("renorm", "rebalancer",
                "Anonymous (2019), FastNorm: improving numerical stability of neural network "
                "training with efficient normalization (ICLR submission), section 3.1",
                "rescale weight-normalized rows to unit norm after every step (explicit "
                "normalization)", rebalancer=Renormalize, pairs_with="weight"))


def public_classes() -> list[type]:
    """Every class of :attr:`Method.classes` over the registered methods, each once, in
    registration order: what ``normlab`` exports by name, so a new method's classes are
    public as soon as it is registered."""
    return list(dict.fromkeys(cls for method in _REGISTRY.values() for cls in method.classes))


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
        dim: 1 for inputs of shape (N, C) or (N, C, L), 2 for (N, C, H, W), 3 for
            (N, C, D, H, W).
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
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1 (for (N, C[, L]) inputs), 2 (for (N, C, H, W)) or 3 "
                         f"(for (N, C, D, H, W)); got {dim!r}")
    checks.positive_int(f"create({name!r})", "num_features", num_features)
    return method.build(num_features, dim, **kw)


def _normlab_norm_dims() -> dict[type, int]:
    """normlab's activation normalizer classes -> the dim each takes."""
    dims: dict[type, int] = {}
    for method in _REGISTRY.values():
        dims.update(method.dims)
    return dims


def _activation_norm(module: nn.Module, normlab_dims: dict[type, int]
                     ) -> tuple[type, int | None] | None:
    """(class, the dim it fixes or None) of the normalizer `module` is an instance of:
    normlab's classes first (one may also derive from a torch class), then torch's."""
    for cls, dim in normlab_dims.items():
        if isinstance(module, cls):
            return cls, dim
    return module_kinds.torch_norm(module)


def _layer_dim(layer: nn.Module) -> int:
    """The dim (as `create` takes it) of a weight layer's output: 1 for a Linear, N for a
    ConvNd."""
    kernel_size = getattr(layer, "kernel_size", None)
    return len(kernel_size) if isinstance(kernel_size, tuple) else 1


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


# what a normalizer learned that its replacement can take over: the affine parameters and
# BatchNorm's running statistics (Batch Renormalization and Online Normalization evaluate with
# the same two, so a trained BatchNorm model converts with its evaluation-mode function)
_CARRIED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _carry_over(source: nn.Module, target: nn.Module) -> None:
    """Copy each tensor of _CARRIED that `source` and `target` both hold with one shape."""
    for name in _CARRIED:
        src, dst = getattr(source, name, None), getattr(target, name, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and \
                src.shape == dst.shape:
            with torch.no_grad():
                dst.copy_(src)


def convert(model: nn.Module, name: str, keep_activation_norm: bool = False,
            dim: int | None = None, **kw) -> nn.Module:
    """Return a copy of `model` with its normalization swapped for `name`.

    Layers are matched with isinstance, so subclasses count; a subclass that overrides
    its base's ``forward`` is replaced only when registered with the steps it adds
    (:func:`normlab.register_norm_subclass`: the replacement is the new layer followed by
    them), and is otherwise refused with a ValueError naming it.

    * Activation target: every normalizer, torch's (BatchNorm1d/2d/3d, SyncBatchNorm,
      InstanceNorm1d/2d/3d, GroupNorm, LayerNorm and their subclasses) and normlab's
      activation normalizers, becomes `name` with the same number of features; the affine
      parameters and the running statistics (``running_mean``, ``running_var``,
      ``num_batches_tracked``) are copied where both layers hold them with one shape, so a
      trained BatchNorm model converted to Batch Renormalization (or Online Normalization,
      up to its clamp) keeps its evaluation-mode function. Its dim is the one its class
      fixes; GroupNorm and SyncBatchNorm fix none: theirs is `dim` when given, else that of
      the nearest layer before it in the model's module order that says (a Linear: 1, a
      ConvNd: N, a normalizer of fixed dim), else 2.
    * Weight target: each layer the method replaces (nn.Linear, nn.ConvNd, by its
      ``replaces`` keys) becomes the normalized layer through its ``from_module``, so the
      function is unchanged at that moment where the class declares
      ``from_module_keeps_function`` (EquiNorm and Weight Standardization do not: their
      docstrings say what they keep), and the activation normalizers become nn.Identity,
      unless ``keep_activation_norm=True``. Layers with weights the method cannot replace
      (nn.ConvTranspose*, nn.Bilinear, a ConvNd the method has no class for,
      nn.MultiheadAttention) stay as they are, listed by one warning. A lazy module must
      have run its first forward pass (before it, it has no parameters to copy).

    Each new layer is built on the device and in the dtype of the layer it
    replaces (of the model, for a layer without parameters or buffers) and
    takes its training mode. The input model is not modified.

    Args:
        model: the model to copy.
        name: a method of :func:`available` (not a rebalancer).
        keep_activation_norm: weight target: keep the activation normalizers.
        dim: activation target: the dim (1, 2 or 3) of the normalizers whose class fixes
            none (GroupNorm, SyncBatchNorm); default: from the layer before each.
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
            f"layer; use normlab.{method.rebalancer.__name__}(model, optimizer)"
        )
    if dim is not None and dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (or None: from the layer before each "
                         f"normalizer), got {dim!r}")
    lazy = [f"{path} ({type(m).__name__})" for path, m in model.named_modules()
            if module_kinds.uninitialized(m)]
    if lazy:
        raise ValueError(f"convert: lazy modules whose parameters do not exist yet: "
                         f"{', '.join(lazy)}; run one forward pass through the model first")
    model = copy.deepcopy(model)
    model_factory = _factory_kw(model)
    normlab_dims = _normlab_norm_dims()
    first_weight_layer = True
    context_dim = None  # the dim of the last layer walked that fixes one
    left_in_place: list[str] = []

    def replace_norm(child: nn.Module, base: type, fixed_dim: int | None) -> nn.Module | None:
        if method.family == "weight" and keep_activation_norm:
            return None
        if method.family == "activation":
            new = create(name, _num_features(child), fixed_dim or dim or context_dim or 2,
                         **{**(_factory_kw(child) or model_factory), **kw})
            _carry_over(child, new)
            steps = [new, *module_kinds.extra_steps(child, base, f"{name} normalizer")]
        else:
            steps = module_kinds.extra_steps(child, base, "nn.Identity")
        return steps[0] if len(steps) == 1 else nn.Sequential(*steps) if steps else nn.Identity()

    def replace_weight_layer(child: nn.Module, path: str) -> nn.Module | None:
        nonlocal first_weight_layer
        first, first_weight_layer = first_weight_layer, False
        plain = next((plain for plain in method.replaces if isinstance(child, plain)), None)
        if plain is None:
            left_in_place.append(f"{path} ({type(child).__name__})")
            return None
        module_kinds.require_base_forward(child, plain, method.replaces[plain].__name__)
        layer_kw = {**kw, **(method.first_layer_kw if first else {})}
        return method.replaces[plain].from_module(child, **layer_kw)

    def swap(parent: nn.Module, prefix: str) -> None:
        nonlocal context_dim, first_weight_layer
        for child_name, child in parent.named_children():
            new = None
            norm = _activation_norm(child, normlab_dims)
            if norm is not None:
                context_dim = norm[1] or context_dim
                new = replace_norm(child, *norm)
            elif isinstance(child, (WeightNormalizedLayer, *module_kinds.WEIGHT_LAYERS)):
                context_dim = _layer_dim(child)
                if method.family != "weight":
                    continue
                if isinstance(child, WeightNormalizedLayer):  # normlab's: already normalized
                    first_weight_layer = False
                    continue
                new = replace_weight_layer(child, prefix + child_name)
                if new is None:
                    continue
            if new is not None:
                setattr(parent, child_name, new.train(child.training))
            else:
                swap(child, f"{prefix}{child_name}.")

    swap(model, "")
    if left_in_place:
        warnings.warn(f"convert(model, {name!r}) left {len(left_in_place)} layer(s) with "
                      f"weights that {name} cannot replace as they are: "
                      f"{', '.join(left_in_place)}", stacklevel=2)
    _drop_absorbed_activations(model, method)
    return model


# the calls, besides the module's, that compute what an activation module does
_FUNCTIONAL_FORMS = {nn.ReLU: (torch.relu, torch.relu_, nn.functional.relu, "relu", "relu_")}
# modules that scale each value by a factor >= 0 (0 or 1 / (1 - p)), so that a ReLU after
# them is one before them: MONAI's blocks put a dropout between normalizer and activation
_NONNEGATIVE_SCALINGS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _drop_absorbed_activations(model: nn.Module, method: Method) -> None:
    """Replace by nn.Identity each activation module that a normalizer of `method` absorbs
    (`absorbs_following`: FRN's TLU, the ReLU) where the traced forward shows it called on
    that normalizer's output alone (normlab.fold.feeds), directly or through dropouts;
    warn where one follows a normalizer but cannot be replaced (called elsewhere too, or
    as a function) or where the forward cannot be traced. At conversion the function is
    kept: the normalizer's own activation starts as the one replaced (FRN's tau = 0)."""
    absorbing = tuple(cls for cls in method.dims if cls.absorbs_following)
    if not absorbing:
        return
    untraceable, kept = [], []
    for path, root, graph in traced(model, lambda m: isinstance(m, absorbing), untraceable):
        sole_consumer = dict(feeds(root, graph))
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(root.get_submodule(node.target),
                                                          absorbing):
                continue
            absorbed = root.get_submodule(node.target).absorbs_following
            consumer = sole_consumer.get(node.target)
            while consumer is not None and \
                    type(root.get_submodule(consumer)) in _NONNEGATIVE_SCALINGS:
                consumer = sole_consumer.get(consumer)
            if consumer is not None and type(root.get_submodule(consumer)) in absorbed:
                parent, _, child = consumer.rpartition(".")
                training = root.get_submodule(consumer).training
                setattr(root.get_submodule(parent), child, nn.Identity().train(training))
            elif any(_computes(root, user, absorbed) for user in node.users):
                kept.append(path + node.target)
    if kept:
        warnings.warn(f"convert(model, {method.name!r}): the activation after "
                      f"{', '.join(kept)} stays (called elsewhere too, or as a function: "
                      f"replacing it would change more than that step); the normalizer's own "
                      f"activation replaces it in the paper", stacklevel=3)
    if untraceable:
        warnings.warn(f"convert(model, {method.name!r}): torch.fx cannot trace "
                      f"{'; '.join(untraceable)}; an activation right after a new normalizer "
                      f"there stays (inside the submodules it can trace, it was replaced)",
                      stacklevel=3)


def _computes(root: nn.Module, node, activations: tuple[type, ...]) -> bool:
    """Whether graph node `node` computes one of `activations`, as a module or a function."""
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) in activations
    return node.op in ("call_function", "call_method") and any(
        node.target in _FUNCTIONAL_FORMS.get(activation, ()) for activation in activations)

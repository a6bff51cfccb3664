"""normlab: normalization layers for deep-network training, and a suite that
reproduces and compares them.

Example:
    >>> import normlab
    >>> normlab.available()[:3]
    ['none', 'batch', 'layer']
    >>> bn_model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
    >>> gn_model = normlab.convert(bn_model, "group", num_groups=8)
"""

import importlib

from . import _moved, functional
from .distributed import convert_sync
from .fold import fold
from .layers.batch_renorm import BatchRenorm1d, BatchRenorm2d
from .layers.equinorm import EquiNormConv1d, EquiNormConv2d, EquiNormConv3d, EquiNormLinear
from .layers.fastnorm import FastNormConv1d, FastNormConv2d, FastNormConv3d, FastNormLinear
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
from .optim import FastNormSGD
from .rebalancers import ENorm, Renormalize
from .registry import Method, available, convert, create

__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "ENorm", "EquiNormConv1d", "EquiNormConv2d",
    "EquiNormConv3d", "EquiNormLinear", "FastNormConv1d", "FastNormConv2d", "FastNormConv3d",
    "FastNormLinear", "FastNormSGD", "Method", "NormPropConv1d", "NormPropConv2d",
    "NormPropConv3d", "NormPropLinear", "OnlineNorm1d", "OnlineNorm2d", "Renormalize",
    "ScaledWeightNormConv1d", "ScaledWeightNormConv2d", "ScaledWeightNormConv3d",
    "ScaledWeightNormLinear", "WeightNormConv1d", "WeightNormConv2d", "WeightNormConv3d",
    "WeightNormLinear", "available", "convert", "convert_sync", "create", "data", "fold",
    "functional", "models",
]
__version__ = "0.1.0"

_moved.install()


def __getattr__(name: str):
    # The lab's modules (normlab.data, normlab.models, ...) load on first use, so that
    # `import normlab` needs neither the lab's code nor its dependencies.
    if name in _moved.LAB_MODULES or f"{__name__}.{name}" in _moved.DEPRECATED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""normlab: normalization layers for deep-network training, and a suite that
reproduces and compares them.

Example:
    >>> import normlab
    >>> normlab.available()[:3]
    ['none', 'batch', 'layer']
    >>> gn_model = normlab.convert(bn_model, "group", num_groups=8)
"""

from . import data, models
from .enorm import ENorm
from .layers.equinorm import EquiNormConv2d, EquiNormLinear
from .registry import Method, available, convert, create

__all__ = ["ENorm", "EquiNormConv2d", "EquiNormLinear", "Method", "available", "convert",
           "create", "data", "models"]
__version__ = "0.1.0"

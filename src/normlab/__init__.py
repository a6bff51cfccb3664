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
from .freeze import freeze, unfreeze
from .module_kinds import register_norm_subclass
from .registry import Method, available, convert, create, public_classes

# Every registered method's classes (layers, rebalancers, optimizers) by name: registering a
# method makes them public, with no list here to keep.
globals().update({cls.__name__: cls for cls in public_classes()})
__all__ = ["Method", "available", "convert", "convert_sync", "create", "data", "fold", "freeze",
           "functional", "models", "public_classes", "register_norm_subclass", "unfreeze"]
__all__ += sorted(cls.__name__ for cls in public_classes())
__version__ = "0.1.0"

_moved.install()


def __getattr__(name: str):
    # The lab's modules (normlab.data, normlab.models, ...) load on first use, so that
    # `import normlab` needs neither the lab's code nor its dependencies.
    if name in _moved.LAB_MODULES or f"{__name__}.{name}" in _moved.DEPRECATED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

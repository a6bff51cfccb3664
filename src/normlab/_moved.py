"""Modules under the names they had before they moved (the lab into :mod:`normlab.lab`, the
kernel loader into :mod:`normlab._ext`, ...).

``normlab.data``, ``normlab.models``, ``normlab.training``, ``normlab.experiments`` (and
the lab's other modules, submodules included) stay importable by their old names and are
the same module objects as their new ones, so code, pickles and stored probe names written
before the move keep working, while ``import normlab`` imports none of them. The lab's
names are its public ones; the other old names warn (DeprecationWarning).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

LAB_MODULES = ("bench", "cli", "data", "experiments", "models", "text", "training")


# old module -> new module, for the modules that moved out of the lab's way
DEPRECATED = {"normlab._native": "normlab._ext.loader",
              "normlab.kernels": "normlab.functional.aten_helpers",
              "normlab.enorm": "normlab.rebalancers.enorm",
              "normlab.renorm": "normlab.rebalancers.row_renorm"}


def new_name(old_name: str) -> str | None:
    """The module's name now, for a name it had before it moved; None for any other name."""
    package, _, rest = old_name.partition(".")
    if package == "normlab" and rest.split(".")[0] in LAB_MODULES:
        return f"normlab.lab.{rest}"
    if old_name in DEPRECATED:
        warnings.warn(f"{old_name} is now {DEPRECATED[old_name]}", DeprecationWarning,
                      stacklevel=3)
        return DEPRECATED[old_name]
    return None


class LabAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module's old name as the module itself (one object, two names)."""

    def __init__(self):
        self._own_specs = {}

    def find_spec(self, fullname, path=None, target=None):
        moved_to = new_name(fullname)
        if moved_to is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self)
        spec.loader_state = moved_to
        return spec

    def create_module(self, spec):
        module = importlib.import_module(spec.loader_state)
        self._own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        # the import system gave the module the alias's spec; it keeps its own
        module.__spec__ = self._own_specs.pop(module.__name__)


def install() -> None:
    """Put the aliases first on sys.meta_path (before the finder that would load a second
    copy of ``normlab.experiments.store`` from the package's path); once per process."""
    if not any(isinstance(finder, LabAliases) for finder in sys.meta_path):
        sys.meta_path.insert(0, LabAliases())
